"""Overhead of ActorPool.run for no-op tasks: the Ray side of the bridge alone.

Two figures per batch size: one batch at a time (p50/p99 latency, tasks/s) and
``--inflight`` batches at once, as the bridge pipelines them (tasks/s).

    python benchmarks/pool_overhead.py                       # 2 actors, sizes 1 100 1000
    python benchmarks/pool_overhead.py --work-s 0 0.005 --sizes 100 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import ray

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool.actor_pool import ActorPool


def noop(payload: bytes, shared: bytes | None) -> bytes:
    return payload


async def measure(pool: ActorPool, size: int, batches: int, inflight: int) -> dict[str, float]:
    payloads = [b"%016d" % i for i in range(size)]
    for _ in range(5):  # warm up: session start, code paths
        await pool.run("bench", payloads)
    latencies = []
    start = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        await pool.run("bench", payloads)
        latencies.append(time.perf_counter() - t)
    serial_s = time.perf_counter() - start

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(batches):
        queue.put_nowait(i)

    async def lane() -> None:
        while not queue.empty():
            queue.get_nowait()
            await pool.run("bench", payloads)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    piped_s = time.perf_counter() - start
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
        "serial_tasks_per_s": size * batches / serial_s,
        "pipelined_tasks_per_s": size * batches / piped_s,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--min-chunk", type=int, default=16)
    parser.add_argument(
        "--work-s",
        type=float,
        nargs="+",
        default=[0.005],
        help="min_chunk_work_s values to compare (0 = split by min_chunk alone)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks per measurement")
    parser.add_argument("--max-batches", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=4)
    args = parser.parse_args()
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    print(f"actors={args.actors} inflight={args.inflight}")
    print(
        f"{'work_s':>7} {'batch':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'serial t/s':>11} {'pipelined t/s':>14}"
    )
    for work_s in args.work_s:
        config = PoolConfig(
            num_actors=args.actors, min_chunk=args.min_chunk, min_chunk_work_s=work_s
        )
        async with ActorPool(noop, config) as pool:
            for size in args.sizes:
                batches = max(20, min(args.max_batches, args.tasks // size))
                r = await measure(pool, size, batches, args.inflight)
                print(
                    f"{work_s:>7g} {size:>6} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                    f"{r['serial_tasks_per_s']:>11.0f} {r['pipelined_tasks_per_s']:>14.0f}"
                )
    ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
