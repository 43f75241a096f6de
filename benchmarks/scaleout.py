"""Scale-out: 16 actors on a head plus 4 worker nodes, 2 ms tasks, against the ideal.

    python benchmarks/scaleout.py --seconds 10 --out benchmarks/out/scaleout.json

One Ray cluster of raylets on this machine (``benchmarks/cluster_host.py``): a head
with 0 CPUs and ``--nodes`` (4) worker nodes of ``--node-cpus`` (4) CPUs each
(bookkeeping CPUs, so that 16 actors of 1 CPU fit on a 2-core machine), worker node
``i`` started with ``METALCORE_WORKER_NODE=bench-worker-<i>``. Per configuration, a
fresh devserver and ``python -m ray_alpcrun.bridge --ray-address <head> --actors 16
--cpus-per-actor 1 --handler benchmarks.sleep_handler:sleep_2ms`` on the head, with
``--bridges one`` and ``--bridges per-node`` (or, for a CLI without that flag, once
without it). The cluster is started once for all of them; ``--rounds`` alternates
the configurations that many times.

A configuration's measurement: a warm-up, then one session of ``--seconds`` x ideal
tasks (empty payloads; each sleeps 2 ms) at ``--batch`` (10) tasks a batch, all
submitted at once. Prints tasks/s, the ideal (actors / 2 ms = 8,000 tasks/s) and
their ratio, and the node names under which the queue manager saw the logical
workers registered (``{node: workers}``). The tasks sleep, so the cores are the
bridge's: the ratio measures how well the deployment keeps 16 actors busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import systems  # noqa: E402
from benchmarks.sleep_handler import TASK_S  # noqa: E402
from ray_alpcrun.client import AsyncClient  # noqa: E402

HANDLER = "benchmarks.sleep_handler:sleep_2ms"
MAX_MESSAGE_BYTES = 4 << 20
WARM_BATCHES_PER_ACTOR = 20


async def load(dev: systems.DevServer, api_key: str, n: int, batch: int, actors: int) -> float:
    """Tasks/s of ``n`` empty sleep tasks submitted at once, after a warm-up."""
    async with AsyncClient(dev.queue, dev.central_cache, api_key=api_key) as client:
        session = await client.create_session(app_id="scaleout")
        try:
            warm = [b""] * (WARM_BATCHES_PER_ACTOR * actors * batch)
            await check(await session.run(warm, batch_size=batch, timeout_s=600), len(warm))
            started = time.perf_counter()
            results = await session.run([b""] * n, batch_size=batch, timeout_s=600)
            elapsed_s = time.perf_counter() - started
            await check(results, n)
        finally:
            await session.close()
    return n / elapsed_s


async def check(results: list[Any], n: int) -> None:
    if len(results) != n or len({r.index for r in results}) != n:
        raise RuntimeError(f"{len(results)} answers for {n} tasks")
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks failed, e.g. {failed[0].error}")


def configuration(
    host: systems.ClusterHost,
    bridges: str | None,
    args: argparse.Namespace,
    api_key: str,
    log: IO[str],
) -> dict[str, Any]:
    ideal = args.actors / TASK_S
    n = max(args.batch, int(ideal * args.seconds) // args.batch * args.batch)
    with systems.devserver(api_key, MAX_MESSAGE_BYTES, log) as dev:
        # cpus=actors: each actor reserves 1 CPU (--cpus-per-actor 1).
        command = systems.bridge_command(
            args.actors, HANDLER, dev, MAX_MESSAGE_BYTES, "direct", float(args.actors)
        )
        if bridges is not None:
            command += ["--bridges", bridges]
        command += args.bridge_args.split()
        t = time.perf_counter()
        with systems.cluster_bridge(host, command, dev, args.actors, log) as dep:
            ready_s = time.perf_counter() - t
            rate = asyncio.run(load(dev, api_key, n, args.batch, args.actors))
            dep.check_alive()
            nodes = dev.stats()["worker_nodes"]
    return {
        "bridges": bridges or "(CLI default, no --bridges flag)",
        "actors": args.actors,
        "batch_size": args.batch,
        "tasks": n,
        "tasks_per_s": round(rate, 1),
        "ideal_tasks_per_s": round(ideal, 1),
        "ratio": round(rate / ideal, 3),
        "ready_s": round(ready_s, 1),
        "worker_nodes": nodes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="ideal seconds of work (10)")
    p.add_argument("--nodes", type=int, default=4, help="worker nodes (4)")
    p.add_argument("--node-cpus", type=float, default=4, help="CPUs per worker node (4)")
    p.add_argument("--actors", type=int, default=16, help="pool actors (16)")
    p.add_argument("--batch", type=int, default=10, help="tasks per batch (10)")
    p.add_argument("--rounds", type=int, default=1, help="times every configuration runs (1)")
    p.add_argument("--modes", default="one,per-node", help="--bridges values to run (one,per-node)")
    p.add_argument("--bridge-args", default="", help="more bridge CLI flags, e.g. '--slots 8'")
    p.add_argument("--out", default=None, help="write the rows here as JSON")
    args = p.parse_args()
    modes: list[str | None] = args.modes.split(",") if systems.cli_knows_bridges() else [None]
    log_path = Path(tempfile.mkdtemp(prefix="alpcrun-scaleout-")) / "systems.log"
    print(
        f"{args.actors} actors on {args.nodes} worker nodes of {args.node_cpus:g} CPUs, "
        f"{TASK_S * 1e3:g} ms tasks at batch {args.batch}, ~{args.seconds:g} s each; "
        f"system logs: {log_path}",
        flush=True,
    )
    if modes == [None]:
        print("# the bridge CLI has no --bridges flag: one run per round, without it", flush=True)
    api_key = secrets.token_hex(16)
    rows = []
    started = time.perf_counter()
    with open(log_path, "a") as log:
        host = systems.ClusterHost(api_key, log, workers=args.nodes, worker_cpus=args.node_cpus,
                                   object_store_mb=100)  # fmt: skip
        try:
            print(f"# cluster up in {time.perf_counter() - started:.1f} s: {host.address}")
            for round_ in range(args.rounds):
                for mode in modes:
                    row = {"round": round_, **configuration(host, mode, args, api_key, log)}
                    rows.append(row)
                    print(
                        f"round {round_}  bridges={row['bridges']}  "
                        f"tasks/s {row['tasks_per_s']:,.0f}  ideal {row['ideal_tasks_per_s']:,.0f}"
                        f"  ratio {row['ratio']:.2f}  ({row['tasks']} tasks; ready in "
                        f"{row['ready_s']:g} s)  worker_nodes {json.dumps(row['worker_nodes'])}",
                        flush=True,
                    )
                    if args.out:
                        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        finally:
            host.close()
    print(f"total {time.perf_counter() - started:.0f} s")
    for mode in dict.fromkeys(r["bridges"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["bridges"] == mode]
        print(
            f"bridges={mode}: ratio to ideal median {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} round(s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
