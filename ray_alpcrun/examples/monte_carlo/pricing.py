"""Monte Carlo pricing of European and arithmetic-Asian options on correlated stocks.

The wire formats (compact, little-endian, versioned by a 4-byte magic):

* shared data, :class:`MarketData`: ``b"MCM1"``, n (u32), rate (f64), then
  float64 spots[n], vols[n], dividend yields[n], correlation[n*n];
* task payload, :class:`PricingTask`: ``b"MCT1"``, seed (u64), paths (u64),
  n_contracts (u32), then ``n_contracts`` records of :data:`CONTRACT_DTYPE`;
* result payload, :class:`PricingResult`: ``b"MCR1"``, paths (u64), n (u32),
  book value (f64), book standard error (f64), then ids u32[n], prices f64[n],
  standard errors f64[n].

The model: each stock follows a geometric Brownian motion under the
risk-neutral measure; the stocks' Brownian increments are correlated through
the Cholesky factor of the correlation matrix. A European uses one exact
step to maturity; an Asian averages the price at ``n_steps`` equally spaced
dates (exact log-normal steps). Step ``k`` of every contract on the same
stock shares that stock's normal draw, so an Asian with one step prices
exactly like the European on the same paths, and the book's total (whose
standard error the correlation drives) is consistent across contracts.

The simulation itself lives in :mod:`ray_alpcrun.examples.monte_carlo.engine`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

EUROPEAN = 0
ASIAN = 1

CONTRACT_DTYPE = np.dtype(
    [
        ("id", "<u4"),
        ("underlying", "<u4"),
        ("kind", "u1"),  # EUROPEAN or ASIAN
        ("call", "u1"),  # 1 call, 0 put
        ("_pad", "<u2"),
        ("n_steps", "<u4"),  # averaging dates of an Asian; 1 for a European
        ("strike", "<f8"),
        ("maturity", "<f8"),  # years
    ]
)

_MARKET_MAGIC = b"MCM1"
_TASK_MAGIC = b"MCT1"
_RESULT_MAGIC = b"MCR1"
_TASK_HEAD = struct.Struct("<4sQQI")
_RESULT_HEAD = struct.Struct("<4sQIdd")
_MARKET_HEAD = struct.Struct("<4sId")
MAX_STEPS = 10_000

FloatArray = npt.NDArray[np.float64]


class FormatError(ValueError):
    """Raised when a payload is not in the format this example writes."""


# ---------------------------------------------------------------- market data


@dataclass(frozen=True)
class MarketData:
    """Spots, volatilities, dividend yields and correlation of ``n`` stocks; one rate.

    ``chol`` is the lower Cholesky factor of ``corr``. Array fields are NumPy
    arrays after :func:`decode_market` and CuPy arrays once a GPU actor has
    moved them (``Device.to_device`` recurses into dataclasses).
    """

    rate: float
    spots: FloatArray
    vols: FloatArray
    dividends: FloatArray
    corr: FloatArray
    chol: FloatArray

    @property
    def n(self) -> int:
        return int(self.spots.shape[0])

    @classmethod
    def create(
        cls,
        rate: float,
        spots: npt.ArrayLike,
        vols: npt.ArrayLike,
        dividends: npt.ArrayLike,
        corr: npt.ArrayLike,
    ) -> MarketData:
        """Validate and build (computes the Cholesky factor)."""
        s = np.ascontiguousarray(spots, dtype=np.float64).reshape(-1)
        n = s.shape[0]
        v = np.ascontiguousarray(vols, dtype=np.float64).reshape(-1)
        q = np.ascontiguousarray(dividends, dtype=np.float64).reshape(-1)
        c = np.ascontiguousarray(corr, dtype=np.float64).reshape(n, n) if n else np.zeros((0, 0))
        if n == 0:
            raise FormatError("market data needs at least one stock")
        if v.shape != (n,) or q.shape != (n,):
            raise FormatError("spots, vols and dividends must have the same length")
        if not (np.all(s > 0) and np.all(v > 0) and np.all(np.isfinite(q))):
            raise FormatError("spots and vols must be positive, dividends finite")
        if not math.isfinite(rate):
            raise FormatError("rate must be finite")
        if not np.allclose(c, c.T) or not np.allclose(np.diag(c), 1.0):
            raise FormatError("correlation must be symmetric with a unit diagonal")
        try:
            chol = np.linalg.cholesky(c)
        except np.linalg.LinAlgError as exc:
            raise FormatError("correlation matrix is not positive definite") from exc
        return cls(float(rate), s, v, q, c, np.ascontiguousarray(chol))


def encode_market(market: MarketData) -> bytes:
    """Market data as shared-data bytes."""
    m = market
    arrays = [np.asarray(a, dtype="<f8").reshape(-1) for a in (m.spots, m.vols, m.dividends)]
    arrays.append(np.asarray(m.corr, dtype="<f8").reshape(-1))
    return _MARKET_HEAD.pack(_MARKET_MAGIC, m.n, m.rate) + b"".join(a.tobytes() for a in arrays)


def decode_market(data: bytes) -> MarketData:
    """Inverse of :func:`encode_market` (validates)."""
    if len(data) < _MARKET_HEAD.size:
        raise FormatError("market data too short")
    magic, n, rate = _MARKET_HEAD.unpack_from(data)
    if magic != _MARKET_MAGIC:
        raise FormatError(f"not market data (magic {magic!r})")
    expected = _MARKET_HEAD.size + 8 * (3 * n + n * n)
    if len(data) != expected:
        raise FormatError(f"market data for {n} stocks must be {expected} bytes, got {len(data)}")
    flat = np.frombuffer(data, dtype="<f8", offset=_MARKET_HEAD.size)
    return MarketData.create(
        rate, flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n], flat[3 * n :].reshape(n, n)
    )


# ---------------------------------------------------------------- tasks and results


@dataclass(frozen=True)
class PricingTask:
    """A set of contracts to price with ``paths`` paths from random stream ``seed``."""

    seed: int
    paths: int
    contracts: npt.NDArray[np.void]

    def validate(self, n_stocks: int | None = None) -> None:
        """Raise :class:`FormatError` unless every contract can be priced."""
        c = self.contracts
        if self.paths < 2:
            raise FormatError("a task needs at least 2 paths (for a standard error)")
        if c.shape[0] == 0:
            raise FormatError("a task needs at least one contract")
        if np.any((c["kind"] != EUROPEAN) & (c["kind"] != ASIAN)):
            raise FormatError("contract kind must be 0 (European) or 1 (Asian)")
        if np.any(c["call"] > 1):
            raise FormatError("contract call flag must be 0 (put) or 1 (call)")
        if not (np.all(c["strike"] > 0) and np.all(c["maturity"] > 0)):
            raise FormatError("strikes and maturities must be positive")
        if not np.all(np.isfinite(c["strike"]) & np.isfinite(c["maturity"])):
            raise FormatError("strikes and maturities must be finite")
        steps = c["n_steps"]
        if np.any((c["kind"] == ASIAN) & ((steps < 1) | (steps > MAX_STEPS))):
            raise FormatError(f"an Asian needs 1..{MAX_STEPS} averaging dates")
        if n_stocks is not None and np.any(c["underlying"] >= n_stocks):
            bad = int(c["underlying"].max())
            raise FormatError(f"contract on stock {bad} but the market has {n_stocks} stocks")

    def steps(self) -> int:
        """Time steps this task simulates: the most averaging dates of its Asians, else 1."""
        c = self.contracts
        asian = c["n_steps"][c["kind"] == ASIAN]
        return int(asian.max()) if asian.size else 1


def make_contracts(
    underlying: npt.ArrayLike,
    kind: npt.ArrayLike,
    call: npt.ArrayLike,
    strike: npt.ArrayLike,
    maturity: npt.ArrayLike,
    n_steps: npt.ArrayLike = 1,
    ids: npt.ArrayLike | None = None,
) -> npt.NDArray[np.void]:
    """Build a contract array (broadcasting scalars); Europeans get ``n_steps = 1``."""
    u, k, cp, s, t, m = np.broadcast_arrays(
        np.asarray(underlying), np.asarray(kind), np.asarray(call), np.asarray(strike),
        np.asarray(maturity), np.asarray(n_steps),
    )  # fmt: skip
    out = np.zeros(u.shape[0] if u.ndim else 1, dtype=CONTRACT_DTYPE)
    out["id"] = np.arange(out.shape[0]) if ids is None else np.asarray(ids)
    out["underlying"] = u.reshape(-1)
    out["kind"] = k.reshape(-1)
    out["call"] = cp.reshape(-1)
    out["strike"] = s.reshape(-1)
    out["maturity"] = t.reshape(-1)
    out["n_steps"] = np.where(out["kind"] == ASIAN, m.reshape(-1), 1)
    return out


def encode_task(task: PricingTask) -> bytes:
    c = np.ascontiguousarray(task.contracts, dtype=CONTRACT_DTYPE)
    head = _TASK_HEAD.pack(_TASK_MAGIC, task.seed, task.paths, c.shape[0])
    return head + c.tobytes()


def decode_task(data: bytes) -> PricingTask:
    if len(data) < _TASK_HEAD.size:
        raise FormatError("task payload too short")
    magic, seed, paths, n = _TASK_HEAD.unpack_from(data)
    if magic != _TASK_MAGIC:
        raise FormatError(f"not a pricing task (magic {magic!r})")
    if len(data) != _TASK_HEAD.size + n * CONTRACT_DTYPE.itemsize:
        raise FormatError(f"task with {n} contracts has the wrong length {len(data)}")
    contracts = np.frombuffer(data, dtype=CONTRACT_DTYPE, count=n, offset=_TASK_HEAD.size)
    return PricingTask(seed=seed, paths=paths, contracts=contracts)


@dataclass(frozen=True)
class PricingResult:
    """Prices and standard errors of a task's contracts, in the task's order."""

    ids: npt.NDArray[np.uint32]
    prices: FloatArray
    stderr: FloatArray
    paths: int
    book_value: float
    book_stderr: float


def encode_result(result: PricingResult) -> bytes:
    n = result.ids.shape[0]
    head = _RESULT_HEAD.pack(_RESULT_MAGIC, result.paths, n, result.book_value, result.book_stderr)
    return (
        head
        + np.asarray(result.ids, dtype="<u4").tobytes()
        + np.asarray(result.prices, dtype="<f8").tobytes()
        + np.asarray(result.stderr, dtype="<f8").tobytes()
    )


def decode_result(data: bytes) -> PricingResult:
    if len(data) < _RESULT_HEAD.size:
        raise FormatError("result payload too short")
    magic, paths, n, book, book_se = _RESULT_HEAD.unpack_from(data)
    if magic != _RESULT_MAGIC or len(data) != _RESULT_HEAD.size + 20 * n:
        raise FormatError("not a pricing result")
    off = _RESULT_HEAD.size
    ids = np.frombuffer(data, dtype="<u4", count=n, offset=off)
    prices = np.frombuffer(data, dtype="<f8", count=n, offset=off + 4 * n)
    stderr = np.frombuffer(data, dtype="<f8", count=n, offset=off + 12 * n)
    return PricingResult(ids, prices, stderr, paths, book, book_se)


# ---------------------------------------------------------------- closed forms


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def black_scholes(
    spot: float,
    strike: float,
    maturity: float,
    rate: float,
    dividend: float,
    vol: float,
    call: bool,
) -> float:
    """Black-Scholes-Merton price of a European option (continuous dividend yield)."""
    sd = vol * math.sqrt(maturity)
    d1 = (math.log(spot / strike) + (rate - dividend + 0.5 * vol * vol) * maturity) / sd
    d2 = d1 - sd
    fwd_disc = spot * math.exp(-dividend * maturity)
    k_disc = strike * math.exp(-rate * maturity)
    if call:
        return fwd_disc * _norm_cdf(d1) - k_disc * _norm_cdf(d2)
    return k_disc * _norm_cdf(-d2) - fwd_disc * _norm_cdf(-d1)


def geometric_asian(
    spot: float,
    strike: float,
    maturity: float,
    rate: float,
    dividend: float,
    vol: float,
    call: bool,
    n_steps: int,
) -> float:
    """Closed form of the discretely monitored geometric-average Asian (dates ``kT/n``, k=1..n).

    For calls it bounds the arithmetic Asian from below (AM >= GM on every path).
    """
    m = n_steps
    mu = math.log(spot) + (rate - dividend - 0.5 * vol * vol) * maturity * (m + 1) / (2 * m)
    var = vol * vol * maturity * (m + 1) * (2 * m + 1) / (6 * m * m)
    sd = math.sqrt(var)
    d2 = (mu - math.log(strike)) / sd
    d1 = d2 + sd
    disc = math.exp(-rate * maturity)
    fwd = math.exp(mu + 0.5 * var)
    if call:
        return disc * (fwd * _norm_cdf(d1) - strike * _norm_cdf(d2))
    return disc * (strike * _norm_cdf(-d2) - fwd * _norm_cdf(-d1))


def analytic_prices(market: MarketData, contracts: npt.NDArray[np.void]) -> FloatArray:
    """Black-Scholes for Europeans, NaN for Asians (no closed form)."""
    spots, vols, divs = (
        np.asarray(_host(a)) for a in (market.spots, market.vols, market.dividends)
    )
    out = np.full(contracts.shape[0], np.nan)
    for i, c in enumerate(contracts):
        if c["kind"] == EUROPEAN:
            u = int(c["underlying"])
            out[i] = black_scholes(
                float(spots[u]), float(c["strike"]), float(c["maturity"]), market.rate,
                float(divs[u]), float(vols[u]), bool(c["call"]),
            )  # fmt: skip
    return out


def _host(a: object) -> object:
    get = getattr(a, "get", None)  # CuPy arrays copy back with .get()
    return get() if callable(get) else a
