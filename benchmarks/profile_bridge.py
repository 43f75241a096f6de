"""Profile the bridge path under load: CPU per process and py-spy of the hot ones.

    python benchmarks/profile_bridge.py --workload noop --batch 1000 --workers 1 \
        --seconds 8 --out /tmp/prof [--system reference] [--no-pyspy]

Starts a devserver and the system like ``run.py`` does, keeps the pipeline full
from this process, prints the CPU share of every process of the system, the
devserver and the client, and writes ``py-spy record`` flame graphs (SVG) of
the bridge actor and of each pool actor (``--nonblocking`` sampling).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run, systems  # noqa: E402
from benchmarks.procs import cpu_s, name, thread_cpu  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--system", default="bridge", choices=[*run.BRIDGE_PATHS, "reference", "replicas"]
    )
    p.add_argument("--workload", default="noop", choices=list(run.HANDLERS))
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", default="/tmp/alpcrun-profile")
    p.add_argument("--no-pyspy", action="store_true")
    p.add_argument("--format", default="flamegraph", help="py-spy format (speedscope, raw...)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    api_key = secrets.token_hex(16)
    case = run.Case(args.system, args.workload, args.workers, (args.batch,))
    stop = threading.Event()
    done_tasks = [0]
    log = open(out / "systems.log", "a")  # noqa: SIM115
    with (
        systems.devserver(api_key, run.MAX_MESSAGE_BYTES, log) as dev,
        run.deploy(case, dev, api_key, log) as dep,
    ):

        async def load() -> None:
            async with run.connect(dev, api_key) as client:
                session = await client.create_session(app_id="profile")
                if args.workload == "shared":
                    await session.set_shared_data(run.shared_data(), ttl_s=None)
                # Tasks per run (counted when a run ends): a few seconds' worth.
                n = max(args.batch * 20, min(20000, args.batch * 200))
                if args.workload != "noop":
                    n = max(args.batch * 20, 400)
                sent = run.payloads(args.workload, n)
                while not stop.is_set():
                    results = await session.run(sent, batch_size=args.batch)
                    done_tasks[0] += len(results)
                await session.close()

        loader = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
        loader.start()
        time.sleep(3.0)  # ok: warm-up under load before measuring
        pids = systems.process_tree(dep.root_pids)
        watched = {pid: name(pid) for pid in pids}
        watched[dev.proc.pid] = "devserver"
        watched[os.getpid()] = "client (this process)"
        before = {pid: cpu_s(pid) for pid in watched}
        threads_before = {
            pid: (cmd, thread_cpu(pid))
            for pid, cmd in watched.items()
            if "Bridge" in cmd or "PoolActor" in cmd or "refworker" in cmd
        }
        tasks_before = done_tasks[0]
        spies = []
        if not args.no_pyspy and shutil.which("py-spy"):
            for pid, cmd in watched.items():
                if "Bridge" in cmd or "PoolActor" in cmd or "refworker" in cmd:
                    tag = "bridge" if "Bridge" in cmd else f"worker-{pid}"
                    ext = "svg" if args.format == "flamegraph" else "json"
                    command = ["py-spy", "record", "--nonblocking", "-d", str(int(args.seconds))]
                    command += ["-f", args.format, "-o", str(out / f"{tag}.{ext}")]
                    command += ["--pid", str(pid)]
                    spies.append(subprocess.Popen(command, stdout=log, stderr=log))
        started = time.perf_counter()
        time.sleep(args.seconds)  # ok: the measurement window
        wall_s = time.perf_counter() - started
        rate = (done_tasks[0] - tasks_before) / wall_s
        for spy in spies:
            spy.wait()
        stop.set()
        loader.join(60)
        rows = sorted(
            ((cpu_s(pid) - before[pid]) / wall_s * 100, pid, cmd) for pid, cmd in watched.items()
        )
        print(
            f"{args.system} {args.workload} batch {args.batch} K={args.workers}: "
            f"~{rate:,.0f} tasks/s"
        )
        for share, pid, cmd in reversed(rows):
            if share >= 0.5:
                print(f"{share:6.1f}%  {pid:>7}  {cmd}")
        print(f"total {sum(r[0] for r in rows):.0f}% of {os.cpu_count()} cores; profiles in {out}")
        for pid, (names, t0) in threads_before.items():
            for tid, (tname, t1) in thread_cpu(pid).items():
                share = (t1 - t0.get(tid, (tname, 0.0))[1]) / wall_s * 100
                if share >= 0.5:
                    print(f"   thread {share:5.1f}%  {pid}/{tid} {tname}  ({names[:30]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
