"""Price a book of options through ALPCRUN.CH (or in this process) and print the results.

Through a running grid (queue manager, caches, a bridge serving
``ray_alpcrun.examples.monte_carlo.handler:MonteCarloHandler``)::

    python -m ray_alpcrun.examples.monte_carlo.client \
        --queue 127.0.0.1:1337 --central-cache 127.0.0.1:2337

Everything in this process: local services, Ray and a bridge (``--gpus-per-actor 1``
on a GPU machine)::

    python -m ray_alpcrun.examples.monte_carlo.client --local --actors 2

No grid at all, NumPy (or CuPy with ``--xp cupy``) right here::

    python -m ray_alpcrun.examples.monte_carlo.client --in-process
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ray_alpcrun.examples.monte_carlo.engine import contract_steps, price_tasks
from ray_alpcrun.examples.monte_carlo.pricing import (
    ASIAN,
    EUROPEAN,
    MarketData,
    PricingResult,
    PricingTask,
    analytic_prices,
    decode_result,
    encode_market,
    encode_task,
    make_contracts,
)

HANDLER = "ray_alpcrun.examples.monte_carlo.handler:MonteCarloHandler"
APP_ID = "monte-carlo-example"


def build_book(
    n_stocks: int = 8,
    n_contracts: int = 64,
    asian_fraction: float = 0.5,
    n_steps: int = 52,
    seed: int = 0,
) -> tuple[MarketData, npt.NDArray[np.void]]:
    """A reproducible market and book: strikes within +-20% of spot, maturities 0.25-2 years.

    Contracts cycle over the stocks; the first ``(1 - asian_fraction)`` are
    Europeans, the rest Asians with ``n_steps`` averaging dates; calls and puts alternate.
    """
    if n_stocks < 1 or n_contracts < 1 or not 0 <= asian_fraction <= 1:
        raise ValueError("need n_stocks >= 1, n_contracts >= 1 and 0 <= asian_fraction <= 1")
    rng = np.random.default_rng(seed)
    # One common factor plus noise: a valid correlation matrix with 0.2..0.6 off the diagonal.
    loadings = rng.uniform(0.45, 0.75, n_stocks)
    corr = np.outer(loadings, loadings)
    np.fill_diagonal(corr, 1.0)
    market = MarketData.create(
        rate=0.03,
        spots=rng.uniform(50.0, 150.0, n_stocks),
        vols=rng.uniform(0.15, 0.45, n_stocks),
        dividends=rng.uniform(0.0, 0.03, n_stocks),
        corr=corr,
    )
    idx = np.arange(n_contracts)
    under = idx % n_stocks
    n_eur = round(n_contracts * (1.0 - asian_fraction))
    kind = np.where(idx < n_eur, EUROPEAN, ASIAN)
    strike = np.round(market.spots[under] * rng.uniform(0.8, 1.2, n_contracts), 2)
    maturity = rng.choice([0.25, 0.5, 1.0, 2.0], n_contracts)
    contracts = make_contracts(under, kind, idx % 2 == 0, strike, maturity, n_steps)
    return market, contracts


def make_tasks(
    contracts: npt.NDArray[np.void],
    paths_per_task: int,
    n_tasks: int,
    *,
    contracts_per_task: int | None = None,
    seed: int = 1,
) -> list[PricingTask]:
    """``n_tasks`` tasks of ``paths_per_task`` paths, each with its own seed.

    With ``contracts_per_task`` the book is cut into slices and the tasks cycle
    over them (each slice priced by several independent tasks when
    ``n_tasks`` exceeds the number of slices); by default every task prices the
    whole book.
    """
    per = contracts_per_task or contracts.shape[0]
    slices = [contracts[i : i + per] for i in range(0, contracts.shape[0], per)]
    return [
        PricingTask(seed=seed + i, paths=paths_per_task, contracts=slices[i % len(slices)])
        for i in range(n_tasks)
    ]


@dataclass(frozen=True)
class BookEstimate:
    """Each contract's price combined over every task that priced it."""

    ids: npt.NDArray[np.uint32]
    prices: npt.NDArray[np.float64]
    stderr: npt.NDArray[np.float64]
    paths: npt.NDArray[np.int64]


def combine(results: Sequence[PricingResult]) -> BookEstimate:
    """Pool independent estimates of the same contracts, weighting by paths."""
    sums: dict[int, list[float]] = {}
    for r in results:
        for cid, price, se in zip(
            r.ids.tolist(), r.prices.tolist(), r.stderr.tolist(), strict=True
        ):
            acc = sums.setdefault(cid, [0.0, 0.0, 0.0])
            acc[0] += r.paths * price
            acc[1] += (r.paths * se) ** 2
            acc[2] += r.paths
    ids = np.array(sorted(sums), dtype=np.uint32)
    n = np.array([sums[i][2] for i in ids.tolist()])
    return BookEstimate(
        ids=ids,
        prices=np.array([sums[i][0] for i in ids.tolist()]) / n,
        stderr=np.sqrt(np.array([sums[i][1] for i in ids.tolist()])) / n,
        paths=n.astype(np.int64),
    )


def summarise(
    market: MarketData,
    contracts: npt.NDArray[np.void],
    results: Sequence[PricingResult],
    elapsed_s: float | None = None,
    out: Callable[[str], Any] = print,
    max_rows: int = 24,
) -> dict[str, float]:
    """Print prices, standard errors, the Black-Scholes check and throughput; return the figures.

    ``z`` is (MC - Black-Scholes) / standard error for each European: most
    should lie within +-3.
    """
    est = combine(results)
    by_id = {int(c["id"]): c for c in contracts}
    book = contracts[np.isin(contracts["id"], est.ids)]
    analytic = dict(zip(book["id"].tolist(), analytic_prices(market, book).tolist(), strict=True))
    out(f"{'id':>4} {'stock':>5} {'type':>9} {'K':>8} {'T':>5} {'price':>10} {'stderr':>8}"
        f" {'Black-Scholes':>13} {'z':>6}")  # fmt: skip
    zs: list[float] = []
    for row, (cid, price, se) in enumerate(
        zip(est.ids.tolist(), est.prices.tolist(), est.stderr.tolist(), strict=True)
    ):
        c = by_id[cid]
        kind = ("Eur " if c["kind"] == EUROPEAN else "Asian ") + ("call" if c["call"] else "put")
        bs = analytic[cid]
        z = (price - bs) / se if np.isfinite(bs) and se > 0 else float("nan")
        if np.isfinite(z):
            zs.append(z)
        if row < max_rows:
            bs_text = f"{bs:13.4f}" if np.isfinite(bs) else f"{'-':>13}"
            z_text = f"{z:6.2f}" if np.isfinite(z) else f"{'':>6}"
            out(f"{cid:4d} {int(c['underlying']):5d} {kind:>9} {c['strike']:8.2f} "
                f"{c['maturity']:5.2f} {price:10.4f} {se:8.4f} {bs_text} {z_text}")  # fmt: skip
    if len(est.ids) > max_rows:
        out(f"... {len(est.ids) - max_rows} more contracts")
    paths = float(sum(r.paths for r in results))
    figures = {
        "contracts": float(len(est.ids)),
        "tasks": float(len(results)),
        "paths": paths,
        "max_abs_z": float(max((abs(z) for z in zs), default=float("nan"))),
        "within_3_se": float(sum(abs(z) <= 3 for z in zs)) / len(zs) if zs else float("nan"),
    }
    within = sum(abs(z) <= 3 for z in zs)
    out(f"{len(results)} tasks, {int(paths):,} paths; Europeans within 3 standard errors of "
        f"Black-Scholes: {within}/{len(zs)} (max |z| {figures['max_abs_z']:.2f})")  # fmt: skip
    if elapsed_s is not None and elapsed_s > 0:
        figures["elapsed_s"] = elapsed_s
        figures["paths_per_s"] = paths / elapsed_s
        out(f"{elapsed_s:.3f} s: {paths / elapsed_s:,.0f} paths/s")
    return figures


# ---------------------------------------------------------------- ways to run


def run_in_process(
    market: MarketData, tasks: Sequence[PricingTask], xp: Any = np, **kwargs: Any
) -> tuple[list[PricingResult], float]:
    """Price right here (no grid); returns the results and the seconds taken."""
    start = time.perf_counter()
    results = price_tasks(xp, market, tasks, **kwargs)
    return results, time.perf_counter() - start


def run_on_grid(
    market: MarketData,
    tasks: Sequence[PricingTask],
    *,
    queue: str | None = None,
    central_cache: str | None = None,
    api_key: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
    timeout_s: float | None = 600.0,
) -> tuple[list[PricingResult], float]:
    """Submit the tasks to an ALPCRUN.CH session (market data as its shared data)."""
    from ray_alpcrun.client import Client

    payloads = [encode_task(t) for t in tasks]
    with (
        Client(queue=queue, central_cache=central_cache, api_key=api_key) as client,
        client.create_session(APP_ID, cleanup_on_client_exit=True) as session,
    ):
        session.set_shared_data(encode_market(market))
        start = time.perf_counter()
        answers = session.run(
            payloads, batch_size=batch_size, progress=progress, timeout_s=timeout_s
        )
        elapsed = time.perf_counter() - start
    return [decode_result(a.value()) for a in answers], elapsed


def run_local(
    market: MarketData,
    tasks: Sequence[PricingTask],
    *,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[PricingResult], float]:
    """Start Ray (if needed), local services and a bridge here, then :func:`run_on_grid`."""
    import ray

    from ray_alpcrun.bridge.launch import start_bridge
    from ray_alpcrun.config import BridgeConfig, PoolConfig
    from ray_alpcrun.devserver import LocalServices

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(configure_logging=False)
    try:
        with LocalServices() as services:
            config = BridgeConfig(
                services=services.service_config(),
                handler=HANDLER,
                pool=PoolConfig(num_actors=actors, gpus_per_actor=gpus_per_actor),
            )
            bridge = start_bridge(config)
            try:
                bridge.wait_ready(timeout_s=120.0)
                return run_on_grid(
                    market,
                    tasks,
                    queue=services.queue_address,
                    central_cache=services.central_cache_address,
                    api_key=services.api_key,
                    batch_size=batch_size,
                    progress=progress,
                )
            finally:
                ray.get(bridge.stop(drain=False))
                ray.get(bridge.run_ref)
    finally:
        if started_ray:
            ray.shutdown()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ray_alpcrun.examples.monte_carlo.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="start services, Ray and a bridge here")
    mode.add_argument("--in-process", action="store_true", help="no grid: price in this process")
    p.add_argument(
        "--queue", help="queue manager HOST:PORT (default: METALCORE_QUEUE_MANAGER_ADDR)"
    )
    p.add_argument("--central-cache", help="central cache HOST:PORT")
    p.add_argument("--api-key", help="API key (default: METALCORE_API_KEY)")
    p.add_argument("--stocks", type=int, default=8)
    p.add_argument("--contracts", type=int, default=64)
    p.add_argument("--steps", type=int, default=52, help="averaging dates of the Asians")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--paths", type=int, default=20_000, help="paths per task")
    p.add_argument("--contracts-per-task", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=2, help="--local: pool actors")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="--local: GPUs per actor")
    p.add_argument("--xp", choices=("numpy", "cupy"), default="numpy", help="--in-process only")
    p.add_argument("--seed", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    market, contracts = build_book(args.stocks, args.contracts, n_steps=args.steps)
    tasks = make_tasks(
        contracts, args.paths, args.tasks, contracts_per_task=args.contracts_per_task,
        seed=args.seed,
    )  # fmt: skip
    if args.in_process:
        xp: Any = np
        if args.xp == "cupy":
            import cupy

            xp = cupy
        results, elapsed = run_in_process(market, tasks, xp)
    elif args.local:
        results, elapsed = run_local(
            market, tasks, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
            batch_size=args.batch_size,
        )  # fmt: skip
    else:
        results, elapsed = run_on_grid(
            market, tasks, queue=args.queue, central_cache=args.central_cache,
            api_key=args.api_key, batch_size=args.batch_size,
        )  # fmt: skip
    figures = summarise(market, contracts, results, elapsed)
    print(f"{contract_steps(tasks) / elapsed / 1e6:,.1f} M contract-steps/s")
    return 0 if figures.get("within_3_se", 1.0) >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
