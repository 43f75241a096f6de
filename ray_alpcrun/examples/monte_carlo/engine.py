"""The vectorised simulation, on NumPy or CuPy (``xp``).

:func:`price_tasks` prices several tasks together. Contracts that need the same
simulated quantity (same task, stock, maturity and averaging dates: e.g. a strip
of strikes) share one *path spec*; each spec's statistic (the terminal price for
a European, the average for an Asian; a European is a one-date average) is
simulated per path, and every contract's discounted payoff is then read off
its spec's statistic in one array expression. All tasks of a sub-batch are
stacked into the same ``(paths, specs)`` arrays, so a batch costs a handful of
array operations per time step, not a loop over tasks.

Two ways to simulate the specs' statistics:

* ``"xp"``: generic array code that runs unchanged on NumPy and CuPy (each task
  draws its normals from its own ``xp`` generator);
* ``"cuda"``: one fused CUDA kernel per chunk (:mod:`.cuda_kernel`), random
  numbers made in registers (Philox), for CuPy only.

Each task keeps its own random stream (its seed) and path budget, so a task
prices the same alone or in a batch. Memory is bounded by simulating
``chunk_paths`` paths at a time and by splitting a batch into groups of tasks
whose arrays fit ``max_chunk_bytes``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_alpcrun.examples.monte_carlo.pricing import ASIAN, MarketData, PricingResult, PricingTask

log = logging.getLogger(__name__)

DEFAULT_CHUNK_PATHS_CPU = 2048  # keeps the working set in cache (measured: 1-2k best)
DEFAULT_CHUNK_PATHS_GPU = 262144  # enough threads to fill a large GPU
DEFAULT_MAX_CHUNK_BYTES = 1 << 30
ENGINES = ("auto", "xp", "cuda")

IntArray = np.ndarray[Any, np.dtype[np.int64]]


def is_numpy(xp: Any) -> bool:
    return xp is np


def default_chunk_paths(xp: Any) -> int:
    return DEFAULT_CHUNK_PATHS_CPU if is_numpy(xp) else DEFAULT_CHUNK_PATHS_GPU


def normal_source(xp: Any, seed: int) -> Any:
    """A seeded generator with ``standard_normal(size)`` on ``xp``'s device.

    NumPy: PCG64 with the ziggurat sampler. CuPy: cuRAND through ``RandomState``
    (its host API fills large arrays fastest).
    """
    if is_numpy(xp):
        return np.random.Generator(np.random.PCG64(seed))
    return xp.random.RandomState(seed)


@dataclass
class Group:
    """A group of tasks priced together: path specs and contracts, on ``xp``'s device.

    Specs are ordered by task, so task ``t`` owns specs
    ``task_first[t] : task_first[t] + task_count[t]``.
    """

    tasks: list[PricingTask]
    n_stocks: int
    seeds: np.ndarray[Any, np.dtype[np.uint64]]
    task_first: IntArray
    task_count: IntArray
    task_steps: IntArray
    spec_task: IntArray
    spec_under: IntArray
    spec_steps: IntArray  # host copy, for control flow
    spec_drift: Any  # per-step log drift: (r - q - vol^2/2) dt
    spec_scale: Any  # per-step vol sqrt(dt)
    spec_log_spot: Any
    spec_cols: Any  # column of each spec's normals in a (paths, tasks * stocks) draw
    spec_steps_x: Any  # spec_steps as float64 on the device
    contract_spec: Any
    strike: Any
    sign: Any
    disc: Any
    owner: Any  # (contracts, tasks) one-hot: which task each contract belongs to
    sizes: list[int]

    @property
    def steps(self) -> int:
        return int(self.task_steps.max())


def prepare(xp: Any, market: MarketData, tasks: list[PricingTask]) -> Group:
    """Stack the tasks' contracts and work out their path specs."""
    n = market.n
    contracts = np.concatenate([t.contracts for t in tasks])
    sizes = [t.contracts.shape[0] for t in tasks]
    task_of = np.repeat(np.arange(len(tasks)), sizes)
    steps_c = np.where(contracts["kind"] == ASIAN, contracts["n_steps"], 1).astype(np.int64)
    keys = np.zeros(
        contracts.shape[0],
        dtype=[("task", "<i8"), ("under", "<i8"), ("maturity", "<f8"), ("steps", "<i8")],
    )
    keys["task"], keys["under"] = task_of, contracts["underlying"]
    keys["maturity"], keys["steps"] = contracts["maturity"], steps_c
    specs, contract_spec = np.unique(keys, return_inverse=True)  # sorted: by task first
    spec_task = specs["task"].astype(np.int64)
    spec_under = specs["under"].astype(np.int64)
    spec_steps = specs["steps"].astype(np.int64)
    task_count = np.bincount(spec_task, minlength=len(tasks)).astype(np.int64)
    task_first = np.concatenate([[0], np.cumsum(task_count)[:-1]]).astype(np.int64)
    task_steps = np.array([t.steps() for t in tasks], dtype=np.int64)

    under_x = xp.asarray(spec_under)
    vols = xp.asarray(market.vols)[under_x]
    mu = market.rate - xp.asarray(market.dividends)[under_x] - 0.5 * vols * vols
    dt = xp.asarray(specs["maturity"] / spec_steps)
    owner = np.zeros((contracts.shape[0], len(tasks)))
    owner[np.arange(contracts.shape[0]), task_of] = 1.0
    maturity = contracts["maturity"].astype(np.float64)
    return Group(
        tasks=tasks,
        n_stocks=n,
        seeds=np.array([t.seed for t in tasks], dtype=np.uint64),
        task_first=task_first,
        task_count=task_count,
        task_steps=task_steps,
        spec_task=spec_task,
        spec_under=spec_under,
        spec_steps=spec_steps,
        spec_drift=mu * dt,
        spec_scale=vols * xp.sqrt(dt),
        spec_log_spot=xp.log(xp.asarray(market.spots))[under_x],
        spec_cols=xp.asarray(spec_task * n + spec_under),
        spec_steps_x=xp.asarray(spec_steps.astype(np.float64)),
        contract_spec=xp.asarray(contract_spec.reshape(-1).astype(np.int64)),
        strike=xp.asarray(contracts["strike"].astype(np.float64)),
        sign=xp.asarray(np.where(contracts["call"] == 1, 1.0, -1.0)),
        disc=xp.asarray(np.exp(-market.rate * maturity)),
        owner=xp.asarray(owner),
        sizes=sizes,
    )


def group_tasks(tasks: Sequence[PricingTask], chunk_paths: int, max_bytes: int) -> list[list[int]]:
    """Split task indices into consecutive groups whose chunk arrays fit ``max_bytes``."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, task in enumerate(tasks):
        # (paths, contracts) payoffs and temporaries plus (paths, specs) state.
        cost = chunk_paths * 8 * (4 * task.contracts.shape[0] + 16)
        if current and used + cost > max_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        groups.append(current)
    return groups


class XpSimulator:
    """Simulates the specs' statistics with generic ``xp`` array code."""

    name = "xp"

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self._sources: list[Any] = []
        self._chol_t: Any = None
        self._order_steps: IntArray = np.zeros(0, dtype=np.int64)
        self._restore: Any = None
        self._cols: Any = None
        self._drift: Any = None
        self._scale: Any = None
        self._log_spot: Any = None
        self._steps_x: Any = None
        self._step: Any = None
        if not is_numpy(xp) and hasattr(xp, "ElementwiseKernel"):
            # On CuPy one pass over memory instead of five; the same arithmetic.
            self._step = xp.ElementwiseKernel(
                "T w, T drift, T scale",
                "T logs, T acc",
                "logs += drift + scale * w; acc += exp(logs);",
                "alpcrun_mc_step",
            )

    def start(self, g: Group, chol: Any) -> None:
        xp = self.xp
        self._sources = [normal_source(xp, int(s)) for s in g.seeds]
        self._chol_t = xp.asarray(chol).T.copy()
        # Longest-running specs first: at step k the specs still averaging are a
        # prefix of the columns, so finished ones drop out without any masking.
        order = np.argsort(-g.spec_steps, kind="stable")
        self._order_steps = g.spec_steps[order]
        self._restore = xp.asarray(np.argsort(order))
        order_x = xp.asarray(order)
        self._cols = g.spec_cols[order_x]
        self._drift = g.spec_drift[order_x]
        self._scale = g.spec_scale[order_x]
        self._log_spot = g.spec_log_spot[order_x]
        self._steps_x = g.spec_steps_x[order_x]

    def simulate(self, g: Group, start: int, rows: IntArray, r: int) -> Any:
        """The specs' statistics for paths ``start .. start + r``: shape ``(r, specs)``."""
        xp, n = self.xp, g.n_stocks
        n_specs = g.spec_steps.shape[0]
        logs = xp.broadcast_to(self._log_spot, (r, n_specs)).copy()
        acc = xp.zeros((r, n_specs))
        draws = xp.zeros((r, len(self._sources) * n))
        for k in range(g.steps):
            for t, source in enumerate(self._sources):
                rt = int(rows[t])
                if rt and k < g.task_steps[t]:
                    # Correlate the stocks: z @ L^T has covariance L L^T = corr.
                    draws[:rt, t * n : (t + 1) * n] = source.standard_normal((rt, n)) @ self._chol_t
            live = int(np.count_nonzero(self._order_steps > k))
            self._advance(
                logs[:, :live],
                acc[:, :live],
                draws[:, self._cols[:live]],
                self._drift[:live],
                self._scale[:live],
            )
        acc /= self._steps_x
        return acc[:, self._restore]

    def _advance(self, logs: Any, acc: Any, w: Any, drift: Any, scale: Any) -> None:
        """``logs += drift + scale*w; acc += exp(logs)`` in place (``w`` is scratch)."""
        if self._step is not None:
            self._step(w, drift, scale, logs, acc)
            return
        xp = self.xp
        xp.multiply(w, scale, out=w)
        xp.add(w, drift, out=w)
        xp.add(logs, w, out=logs)
        xp.exp(logs, out=w)
        xp.add(acc, w, out=acc)


def make_simulator(xp: Any, engine: str = "auto") -> Any:
    """``"auto"``: the fused CUDA kernel on CuPy (falling back to ``"xp"``), ``"xp"`` on NumPy."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "xp" or (engine == "auto" and is_numpy(xp)):
        return XpSimulator(xp)
    if is_numpy(xp):
        raise ValueError("the 'cuda' engine needs CuPy")
    from ray_alpcrun.examples.monte_carlo.cuda_kernel import CudaSimulator

    sim = CudaSimulator(xp, fallback=XpSimulator)
    if engine == "cuda":
        return sim
    try:
        sim.compile()
    except Exception as exc:  # e.g. NVRTC missing: the generic path still works
        log.warning("fused CUDA kernel unavailable (%s); using the generic CuPy path", exc)
        return XpSimulator(xp)
    return sim


def price_tasks(
    xp: Any,
    market: MarketData,
    tasks: Sequence[PricingTask],
    *,
    chunk_paths: int | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    engine: str | Any = "auto",
) -> list[PricingResult]:
    """Price every task; results come back on the host, in task order.

    ``market`` may hold NumPy or ``xp`` arrays. With the ``"xp"`` engine a task's
    result depends only on the task, ``xp`` and ``chunk_paths``; the ``"cuda"``
    engine's random numbers do not depend on ``chunk_paths`` either.
    ``engine`` may also be a simulator made by :func:`make_simulator`.
    """
    chunk = chunk_paths or default_chunk_paths(xp)
    if chunk < 1:
        raise ValueError("chunk_paths must be positive")
    for task in tasks:
        task.validate(market.n)
    sim = make_simulator(xp, engine) if isinstance(engine, str) else engine
    results: list[PricingResult] = []
    for group in group_tasks(tasks, chunk, max_chunk_bytes):
        g = prepare(xp, market, [tasks[i] for i in group])
        results.extend(_price_group(xp, sim, g, market.chol, chunk))
    return results


def _price_group(xp: Any, sim: Any, g: Group, chol: Any, chunk: int) -> list[PricingResult]:
    n_tasks = len(g.tasks)
    n_contracts = sum(g.sizes)
    total, total_sq = xp.zeros(n_contracts), xp.zeros(n_contracts)
    book, book_sq = xp.zeros(n_tasks), xp.zeros(n_tasks)
    paths = np.array([t.paths for t in g.tasks], dtype=np.int64)
    sim.start(g, chol)
    for start in range(0, int(paths.max()), chunk):
        rows = np.clip(paths - start, 0, chunk)
        r = int(rows.max())
        stats = sim.simulate(g, start, rows, r)
        s = stats[:, g.contract_spec]
        payoff = g.disc * xp.maximum(g.sign * (s - g.strike), 0.0)
        if np.any(rows < r):  # a task whose budget ends inside this chunk
            valid = xp.asarray((np.arange(r)[:, None] < rows[None, :]).astype(np.float64))
            payoff *= valid @ g.owner.T
        total += payoff.sum(axis=0)
        total_sq += (payoff * payoff).sum(axis=0)
        per_task = payoff @ g.owner
        book += per_task.sum(axis=0)
        book_sq += (per_task * per_task).sum(axis=0)
    host = (lambda a: a) if is_numpy(xp) else xp.asnumpy
    sums = [np.asarray(host(a)) for a in (total, total_sq, book, book_sq)]
    return _results(g, paths, *sums)


def _results(
    g: Group,
    paths: IntArray,
    total: np.ndarray[Any, Any],
    total_sq: np.ndarray[Any, Any],
    book: np.ndarray[Any, Any],
    book_sq: np.ndarray[Any, Any],
) -> list[PricingResult]:
    results: list[PricingResult] = []
    start = 0
    for t, task in enumerate(g.tasks):
        end = start + g.sizes[t]
        n_p = int(paths[t])
        mean, se = mean_stderr(total[start:end], total_sq[start:end], n_p)
        b_mean, b_se = mean_stderr(book[t : t + 1], book_sq[t : t + 1], n_p)
        results.append(
            PricingResult(
                ids=task.contracts["id"].astype(np.uint32),
                prices=mean,
                stderr=se,
                paths=n_p,
                book_value=float(b_mean[0]),
                book_stderr=float(b_se[0]),
            )
        )
        start = end
    return results


def mean_stderr(
    s: np.ndarray[Any, Any], s2: np.ndarray[Any, Any], n: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Sample mean and its standard error from a sum and a sum of squares of ``n`` draws."""
    mean = s / n
    var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1)
    return mean, np.sqrt(var / n)


def contract_steps(tasks: Sequence[PricingTask]) -> int:
    """Work done in contract-steps (paths x each contract's time steps), for throughput."""
    return sum(
        t.paths * int(np.where(t.contracts["kind"] == ASIAN, t.contracts["n_steps"], 1).sum())
        for t in tasks
    )
