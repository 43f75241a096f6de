"""Throughput of client -> devserver -> reference worker -> client, without Ray.

The devserver and the worker(s) run as separate processes (as in production),
the client in this one. Prints tasks/s at each batch size while the pipeline is
full, and the round-trip latency of one batch on an otherwise idle pipeline.

    python benchmarks/throughput_reference.py                # 1:2000, 100:20000, 1000:20000
    python benchmarks/throughput_reference.py --sizes 100:50000 --repeat 5 --workers 2
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.procs import cpu_s  # noqa: E402
from ray_alpcrun.client import Client  # noqa: E402


@contextmanager
def devserver(api_key: str) -> Iterator[tuple[dict[str, str], int]]:
    """Start ``python -m ray_alpcrun.devserver`` on free ports; yield its addresses and pid."""
    ports = ["--queue-port", "0", "--central-cache-port", "0", "--node-cache-port", "0"]
    command = [sys.executable, "-m", "ray_alpcrun.devserver", *ports, "--api-key", api_key]
    proc = subprocess.Popen([*command, "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    addresses: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready"):
                break
            for key in ("queue manager", "central cache", "node cache"):
                if line.startswith(key):
                    addresses[key] = line.split()[-1]
        if len(addresses) != 3:
            raise RuntimeError(f"devserver did not start (exit code {proc.poll()})")
        yield addresses, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def workers(n: int, addresses: dict[str, str], api_key: str, handler: str) -> Iterator[list[int]]:
    """Start ``n`` reference worker processes; yield their pids."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), METALCORE_API_KEY=api_key)
    command = [sys.executable, "-m", "ray_alpcrun.refworker", "--handler", handler]
    command += ["--queue", addresses["queue manager"], "--cache", addresses["node cache"]]
    procs = [
        subprocess.Popen([*command, "--pod", f"bench-{i}", "--log-level", "warning"], env=env)
        for i in range(n)
    ]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def throughput(client: Client, batch_size: int, n_tasks: int) -> float:
    payloads = [b"%015d" % i for i in range(n_tasks)]
    with client.create_session(app_id=f"bench-{batch_size}") as session:
        start = time.perf_counter()
        results = session.run(payloads, batch_size=batch_size, timeout_s=600)
        elapsed = time.perf_counter() - start
    if len(results) != n_tasks or not all(r.ok for r in results):
        raise RuntimeError("benchmark run lost or failed tasks")
    return n_tasks / elapsed


def latencies_ms(client: Client, batch_size: int, rounds: int) -> list[float]:
    payloads = [b"%015d" % i for i in range(batch_size)]
    out = []
    with client.create_session(app_id=f"latency-{batch_size}") as session:
        session.run(payloads, batch_size=batch_size)  # bind a worker first
        for _ in range(rounds):
            start = time.perf_counter()
            session.run(payloads, batch_size=batch_size)
            out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1:2000,100:20000,1000:20000", help="BATCH:TASKS,...")
    p.add_argument("--repeat", type=int, default=3, help="runs per size (best and median shown)")
    p.add_argument("--workers", type=int, default=1, help="reference worker processes")
    p.add_argument("--handler", default="ray_alpcrun.examples.workloads:noop")
    p.add_argument("--latency-rounds", type=int, default=30)
    args = p.parse_args()
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    api_key = secrets.token_hex(16)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.workers} worker(s), "
        f"handler {args.handler}",
        flush=True,
    )
    with (
        devserver(api_key) as (addresses, server_pid),
        workers(args.workers, addresses, api_key, args.handler) as worker_pids,
        Client(addresses["queue manager"], addresses["central cache"], api_key=api_key) as client,
    ):
        pids = {"devserver": [server_pid], "workers": worker_pids, "client": [os.getpid()]}
        throughput(client, 100, 2000)  # warm-up: workers registered, code paths hot
        print(
            f"{'batch':>6} {'tasks':>7} {'best tasks/s':>13} {'median tasks/s':>15} "
            f"{'p50 batch ms':>13} {'p90 batch ms':>13}   CPU % while running (devserver/"
            "workers/client)"
        )
        for batch_size, n_tasks in sizes:
            before = {k: sum(map(cpu_s, v)) for k, v in pids.items()}
            start = time.perf_counter()
            rates = [throughput(client, batch_size, n_tasks) for _ in range(args.repeat)]
            wall_s = time.perf_counter() - start
            load = "/".join(
                f"{(sum(map(cpu_s, v)) - before[k]) / wall_s * 100:.0f}" for k, v in pids.items()
            )
            lat = sorted(latencies_ms(client, batch_size, args.latency_rounds))
            p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
            print(
                f"{batch_size:>6} {n_tasks:>7} {max(rates):>13,.0f} "
                f"{statistics.median(rates):>15,.0f} {statistics.median(lat):>13.2f} "
                f"{p90:>13.2f}   {load}",
                flush=True,
            )
    print("throughput: pipeline full (run() of all tasks); latency: one batch round trip, idle.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
