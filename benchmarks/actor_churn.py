"""What a Ray owner keeps per pool actor it replaces, without ray_alpcrun.

The long chaos run (`python -m tests.support.chaos_cluster --faults 20000`)
finds the coordinator's C heap in use growing by about 6 KB per pool actor
replaced. This measures a plain Ray driver doing only that, two ways:

- ``new``: create an actor, call it, ``ray.kill`` it (what the pool did when
  an actor died, until 2026-12-07: a new actor, a new ActorID);
- ``restart``: one actor with ``max_restarts=-1``, killed with
  ``no_restart=False`` and called again once Ray restarted it (same ActorID;
  what the pool does now, ``RayBackend.recycle``).

    python benchmarks/actor_churn.py --actors 300           # both ways, ~8 min on 2 cores

It prints the heap in use (after ``malloc_trim`` and ``gc.collect``) before and
after, per actor. Measured 2026-12-07 on 2 cores: new 5.6 KB per actor,
restart 1.0 KB per restart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time

import ray

from ray_alpcrun.bridge.debugging import heap_bytes, trim_heap


@ray.remote(num_cpus=0.01)
class Tiny:
    def pid(self) -> int:
        return os.getpid()


def in_use_mb() -> float:
    gc.collect()
    trim_heap()
    figures = heap_bytes()
    if figures is None:
        raise SystemExit("needs glibc (mallinfo2)")
    return figures[0] / 1e6


async def churn(way: str, n: int) -> dict[str, float]:
    kept = Tiny.options(max_restarts=-1).remote() if way == "restart" else None
    if kept is not None:
        await kept.pid.remote()

    async def once() -> None:
        if kept is None:
            actor = Tiny.remote()
            await actor.pid.remote()
            ray.kill(actor)
            return
        ray.kill(kept, no_restart=False)
        while True:
            try:
                await kept.pid.remote()
                return
            except ray.exceptions.RayActorError:
                await asyncio.sleep(0.05)  # ok: waiting for Ray to restart it

    for _ in range(50):  # warm-up: Ray's own caches fill first
        await once()
    await asyncio.sleep(2)
    before, start = in_use_mb(), time.monotonic()
    for _ in range(n):
        await once()
    await asyncio.sleep(2)
    after = in_use_mb()
    if kept is not None:
        ray.kill(kept)
    return {"before_mb": before, "after_mb": after, "kb_each": (after - before) * 1e3 / n,
            "seconds": time.monotonic() - start}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=300, help="actors replaced per way")
    parser.add_argument("--way", choices=("new", "restart", "both"), default="both")
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False)
    ways = ("new", "restart") if args.way == "both" else (args.way,)
    for way in ways:
        r = asyncio.run(churn(way, args.actors))
        heap = f"heap in use {r['before_mb']:.1f} -> {r['after_mb']:.1f} MB"
        print(f"{way:8s} {args.actors} actors: {heap}, {r['kb_each']:.1f} KB each "
              f"({r['seconds']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
