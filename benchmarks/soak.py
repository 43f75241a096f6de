"""Soak: push many tasks through devserver + bridge and sample the bridge's memory.

Rounds of ``--sessions`` concurrent sessions (``--tasks-per-round`` tasks in
all, batches of ``--batch-size``) run one after another, so sessions start and
end all the time, as on a long-lived cluster. After every round the resident
(RSS) and proportional (PSS) memory of the bridge actor and of each pool actor
are read from ``/proc/PID/smaps_rollup``; the curve is printed and written to
``benchmarks/out/soak.json``. One warm-up round is not counted.

    python benchmarks/soak.py                        # 100,000 tasks, batches of 500
    python benchmarks/soak.py --tasks 20000 --batch-size 100
    python benchmarks/soak.py --data-path direct     # over the actors' sockets
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray_alpcrun.config import DATA_PATHS

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
COUNTERS = (
    "submitted_tasks",
    "result_tasks",
    "redeliveries",
    "dropped_results",
    "dead_lettered_tasks",
    "sessions_created",
    "sessions_closed",
)


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        return 0, 0
    return rss, pss


async def one_round(svc: Any, round_no: int, sessions: int, tasks: int, batch: int) -> int:
    from ray_alpcrun.client import AsyncClient

    per_session = tasks // sessions
    payloads = [b"%015d" % i for i in range(per_session)]

    async def session(k: int) -> int:
        async with AsyncClient(
            svc.queue_address,
            svc.central_cache_address,
            api_key=svc.api_key,
            proto_package=svc.proto_package,
        ) as client:
            s = await client.create_session(app_id=f"soak-{round_no}-{k}")
            results = await s.run(payloads, batch_size=batch, timeout_s=600)
            await s.close()
        if len(results) != per_session or not all(r.ok for r in results):
            raise RuntimeError(f"round {round_no}: lost or failed tasks")
        if len({r.index for r in results}) != per_session:
            raise RuntimeError(f"round {round_no}: a task was answered twice")
        return per_session

    done = await asyncio.gather(*(session(k) for k in range(sessions)))
    return sum(done)


def sample(ray: Any, handle: Any) -> dict[str, Any]:
    status = ray.get(handle.status(), timeout=60)
    bridge_rss, bridge_pss = memory_kib(int(status["pid"]))
    actors = [a for a in status["actors"].get("actors", []) if "pid" in a]
    pool = [memory_kib(int(a["pid"])) for a in actors]
    return {
        "bridge_rss_mib": round(bridge_rss / 1024, 1),
        "bridge_pss_mib": round(bridge_pss / 1024, 1),
        "pool_rss_mib": [round(r / 1024, 1) for r, _ in pool],
        "pool_pss_mib": [round(p / 1024, 1) for _, p in pool],
        "tasks_ok": status["tasks_ok"],
        "sessions_bound": len(status["sessions"]),
        "actor_restarts": status.get("actor_restarts", 0),
        "data_paths": [a.get("data_path", "calls") for a in actors],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--tasks-per-round", type=int, default=10_000)
    ap.add_argument("--sessions", type=int, default=2, help="concurrent sessions per round")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--data-path", choices=DATA_PATHS, default="direct")
    args = ap.parse_args()

    # Pool actors import the handler by name; they inherit this path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path.insert(0, str(ROOT))
    import ray

    from ray_alpcrun.bridge.launch import start_bridge
    from ray_alpcrun.config import DevServerConfig
    from ray_alpcrun.devserver import LocalServices
    from tests.support.bridge_support import bridge_config

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    curve: list[dict[str, Any]] = []
    ports = DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)
    with LocalServices(ports) as svc:
        handle = start_bridge(
            bridge_config(
                svc,
                "ray_alpcrun.examples.workloads:noop",
                args.actors,
                log_level="warning",
                data_path=args.data_path,
            )
        )
        handle.wait_ready(120)
        start = time.perf_counter()
        asyncio.run(one_round(svc, 0, args.sessions, args.tasks_per_round, args.batch_size))
        gc.collect()
        curve.append({"tasks": 0, "s": 0.0, **sample(ray, handle)})
        print(json.dumps(curve[-1]), flush=True)
        sent = 0
        start = time.perf_counter()
        round_no = 0
        while sent < args.tasks:
            round_no += 1
            sent += asyncio.run(
                one_round(svc, round_no, args.sessions, args.tasks_per_round, args.batch_size)
            )
            point = {"tasks": sent, "s": round(time.perf_counter() - start, 1)}
            curve.append({**point, **sample(ray, handle)})
            print(json.dumps(curve[-1]), flush=True)
        elapsed = time.perf_counter() - start
        stats = svc.stats()
        ray.get(handle.stop(drain=True), timeout=120)
        code, reason = ray.get(handle.run_ref, timeout=120)
    ray.shutdown()
    first, last = curve[0], curve[-1]
    summary = {
        "tasks": sent,
        "seconds": round(elapsed, 1),
        "tasks_per_s": round(sent / elapsed),
        "batch_size": args.batch_size,
        "data_path": args.data_path,
        "sessions": round_no * args.sessions,
        "bridge_rss_growth_mib": round(last["bridge_rss_mib"] - first["bridge_rss_mib"], 1),
        "pool_rss_growth_mib": [
            round(b - a, 1)
            for a, b in zip(first["pool_rss_mib"], last["pool_rss_mib"], strict=True)
        ],
        "devserver": {k: stats[k] for k in COUNTERS},
        "bridge_exit": [code, reason],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps({"summary": summary, "curve": curve}, indent=1))
    print("summary", json.dumps(summary), flush=True)
    ok = stats["result_tasks"] == stats["submitted_tasks"] and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
