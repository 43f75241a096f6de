"""CPU the bridge and its pool actors burn with no work, per data path.

    python benchmarks/idle_cpu.py --seconds 30 [--data-path direct calls] [--actors 1]

For each data path: starts a devserver and the bridge CLI (its own Ray), runs a few
batches, then measures the CPU of every process of the system over ``--seconds``
with no work: once starting right after the last batch and once more after that
(steady idle). Prints % of one core for the bridge actor, the pool actors and the
whole process tree (Ray's own daemons included, the same for both paths).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run, systems  # noqa: E402
from benchmarks.procs import cpu_s, name  # noqa: E402


def shares(pids: dict[int, str], seconds: float) -> dict[str, float]:
    """% of one core over ``seconds`` from now: bridge actor, pool actors, whole tree."""
    before = {pid: cpu_s(pid) for pid in pids}
    time.sleep(seconds)  # ok: the measurement window itself
    used = {pid: (cpu_s(pid) - before[pid]) / seconds * 100 for pid in pids}
    return {
        "bridge_actor": sum(u for pid, u in used.items() if "Bridge" in pids[pid]),
        "pool_actors": sum(u for pid, u in used.items() if "PoolActor" in pids[pid]),
        "tree": sum(used.values()),
    }


def measure(data_path: str, actors: int, seconds: float, log: object) -> dict[str, object]:
    api_key = secrets.token_hex(16)
    with (
        systems.devserver(api_key, run.MAX_MESSAGE_BYTES, log) as dev,  # type: ignore[arg-type]
        systems.bridge(
            actors,
            run.HANDLERS["noop"],
            dev,
            api_key,
            run.MAX_MESSAGE_BYTES,
            log,  # type: ignore[arg-type]
            data_path=data_path,
        ) as dep,
    ):

        async def work() -> None:
            async with run.connect(dev, api_key) as client:
                session = await client.create_session(app_id="idle-cpu")
                sent = run.payloads("noop", 1000)
                # Long enough for the graphs to come up (actors older than 2 s).
                until = time.monotonic() + 5.0
                while time.monotonic() < until:
                    await session.run(sent, batch_size=10)
                await session.close()

        asyncio.run(work())
        pids = {pid: name(pid) for pid in systems.process_tree(dep.root_pids)}
        after_work = shares(pids, seconds)
        steady = shares(pids, seconds)
    return {"data_path": data_path, "after_work": after_work, "steady": steady}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--data-path", nargs="+", default=["direct", "calls"])
    args = p.parse_args()
    with open(os.devnull, "w") as log:
        for path in args.data_path:
            got = measure(path, args.actors, args.seconds, log)
            for phase in ("after_work", "steady"):
                s = got[phase]
                assert isinstance(s, dict)
                print(
                    f"{path:9} {phase:10} {args.seconds:g} s idle: bridge actor "
                    f"{s['bridge_actor']:.2f}%  pool actors {s['pool_actors']:.2f}%  "
                    f"whole tree {s['tree']:.2f}% of a core",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
