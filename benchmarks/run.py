"""The bridge beside its alternatives: client -> devserver -> workers -> client.

    python benchmarks/run.py --quick --out results.json    # about 4 minutes on 2 cores
    python benchmarks/run.py --out results.json            # the whole matrix
    python benchmarks/run.py --interleave 3 --systems reference,bridge,bridge-cluster \
        --workload noop --batches 1,100,1000 --out interleaved.json   # see interleave.py

Systems: ``reference`` (one plain worker process), ``replicas`` (K plain worker
processes), ``bridge`` (the bridge CLI with K Ray actors, its own Ray, reached over
their Unix sockets: ``--data-path direct``, the default), ``bridge-calls`` (the same
over ordinary Ray actor calls, ``--data-path calls``), ``bridge-cluster`` (the
bridge CLI with ``--ray-address`` on the head, 0 CPUs, of a Ray cluster of raylets
on this machine whose one worker node, ``METALCORE_WORKER_NODE=bench-worker-0``,
has 2 CPUs and the actors; ``bridge-cluster-one`` passes ``--bridges one``). Workloads:
``noop`` (echo), ``cpu`` (about 5 ms of NumPy per task), ``shared`` (every task
sums a slice of 256 MB of shared data). Each deployment gets a fresh devserver
process; the client runs in this process, the same way for every system.

Per row (a fresh session): warm-up batches, then ``tasks_per_s`` with the pipeline
full (every task submitted at once, one ``run``), then ``p50/p99_batch_ms``: the
round trip of one batch on an otherwise idle pipeline, measured at the client from
sending the batch to receiving its result batch. ``peak_pss_mb``: peak total PSS of
every process of the system during the row (sampled every 0.05 s during set-up and
warm-up, when shared data is fetched, then every 0.5 s, and at the end);
``shared_fetches``: GetSharedData calls seen by the node cache during the row.
Rows of the cluster systems also carry ``worker_nodes``: ``{node name: logical
workers}`` registered with the queue manager at the end of the row.
Writes the JSON rows, ``<out>.md`` (table) and ``<out>.png`` (plot) next to each other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import systems  # noqa: E402
from ray_alpcrun.client import AsyncClient  # noqa: E402

ROW_KEYS = (
    "system",
    "workload",
    "batch_size",
    "workers",
    "tasks_per_s",
    "p50_batch_ms",
    "p99_batch_ms",
    "peak_pss_mb",
    "shared_fetches",
)
HANDLERS = {
    "noop": "ray_alpcrun.examples.workloads:noop",
    "cpu": "ray_alpcrun.examples.workloads:cpu",
    "shared": "ray_alpcrun.examples.workloads:shared_sum",
}
SHARED_BYTES = 256 << 20
SHARED_SLICE = 4096  # int64 values each shared task sums
MAX_MESSAGE_BYTES = 512 << 20  # the 256 MB shared data must fit in one gRPC message
# Tasks per throughput measurement, by workload and batch size.
TASKS = {
    "noop": {1: 1000, 10: 5000, 100: 40000, 1000: 100000},
    # cpu: at least 2 windows (10 batches) per worker at K=2, else the first worker's
    # window takes every batch and a plain replica set looks no faster than one worker.
    "cpu": {1: 100, 10: 400, 100: 2000, 1000: 2000},
    "shared": {1: 800, 10: 4000, 100: 10000, 1000: 20000},
}
BATCH_SIZES = (1, 10, 100, 1000)
# The bridge systems and their ``--data-path``.
BRIDGE_PATHS = {"bridge": "direct", "bridge-calls": "calls"}
# The bridge on a cluster of raylets, and its ``--bridges`` (None: the CLI's default).
CLUSTER_BRIDGES: dict[str, str | None] = {"bridge-cluster": None, "bridge-cluster-one": "one"}
SYSTEMS = ("reference", "replicas", *BRIDGE_PATHS, *CLUSTER_BRIDGES)
# One colour per system in every panel of the plot.
COLOURS = {
    "reference": "tab:gray",
    "replicas": "tab:green",
    "bridge": "tab:blue",
    "bridge-calls": "tab:purple",
    "bridge-cluster": "tab:red",
    "bridge-cluster-one": "tab:orange",
}
WINDOW = 10  # the queue manager's default batches in flight per worker
SAMPLE_S = 0.5  # PSS sampling while measuring throughput and latency
FAST_SAMPLE_S = 0.05  # ... and while a row sets up (shared data fetched, warm-up)


@dataclass(frozen=True)
class Case:
    """One deployment: a system with ``workers`` workers, serving one workload."""

    system: str
    workload: str
    workers: int
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class Budget:
    """How long to spend on the idle-latency rounds of a row."""

    latency_s: float = 1.0
    min_rounds: int = 5
    max_rounds: int = 20
    task_scale: float = 1.0


QUICK_BUDGET = Budget()
FULL_BUDGET = Budget(latency_s=3.0, min_rounds=10, max_rounds=50, task_scale=2.0)


def quick_cases() -> list[Case]:
    """Every case the targets name, plus enough rows for lines in the plot."""
    return [
        Case("reference", "noop", 1, BATCH_SIZES),
        Case("bridge", "noop", 1, BATCH_SIZES),
        Case("bridge-calls", "noop", 1, BATCH_SIZES),
        Case("bridge-cluster", "noop", 1, BATCH_SIZES),
        Case("replicas", "noop", 2, (100, 1000)),
        Case("reference", "cpu", 1, (10, 100)),
        Case("replicas", "cpu", 2, (10, 100)),
        Case("bridge", "cpu", 2, (10, 100)),
        Case("replicas", "shared", 1, (100,)),
        Case("replicas", "shared", 4, (100,)),
        Case("bridge", "shared", 1, (100,)),
        Case("bridge", "shared", 4, (100,)),
    ]


def full_cases() -> list[Case]:
    cases = []
    for workload in ("noop", "cpu", "shared"):
        cases.append(Case("reference", workload, 1, BATCH_SIZES))
        for k in (1, 2, 4):
            cases.append(Case("replicas", workload, k, BATCH_SIZES))
            cases.append(Case("bridge", workload, k, BATCH_SIZES))
            cases.append(Case("bridge-cluster", workload, k, BATCH_SIZES))
    return cases


def deployments(case: Case) -> list[Case]:
    """Shared-data rows each get a fresh deployment: workers keep fetched shared data
    after a session ends, which would count one row's data in the next row's memory."""
    if case.workload != "shared":
        return [case]
    return [Case(case.system, case.workload, case.workers, (b,)) for b in case.batch_sizes]


# --- rows ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def make_row(
    case: Case,
    batch_size: int,
    tasks_per_s: float,
    latencies_s: list[float],
    peak_pss_mb: float,
    shared_fetches: int,
) -> dict[str, Any]:
    """One result row, with exactly :data:`ROW_KEYS`."""
    return {
        "system": case.system,
        "workload": case.workload,
        "batch_size": int(batch_size),
        "workers": int(case.workers),
        "tasks_per_s": round(float(tasks_per_s), 1),
        "p50_batch_ms": round(statistics.median(latencies_s) * 1e3, 3),
        "p99_batch_ms": round(percentile(latencies_s, 99) * 1e3, 3),
        "peak_pss_mb": round(float(peak_pss_mb), 1),
        "shared_fetches": int(shared_fetches),
    }


def payloads(workload: str, n: int, start: int = 0) -> list[bytes]:
    if workload == "cpu":
        return [(start + i).to_bytes(8, "little") for i in range(n)]
    if workload == "shared":
        values = SHARED_BYTES // 8
        step = 7919 * SHARED_SLICE  # spread the slices over the whole array
        out = []
        for i in range(start, start + n):
            first = (i * step) % (values - SHARED_SLICE)
            out.append(b"%d:%d" % (first, first + SHARED_SLICE))
        return out
    return [b"%015d" % (start + i) for i in range(n)]


def shared_data() -> bytes:
    import numpy as np

    return np.arange(SHARED_BYTES // 8, dtype="<i8").tobytes()


def check_results(workload: str, sent: list[bytes], results: list[Any]) -> None:
    """Every task answered, none failed, and a few results right."""
    if len(results) != len(sent):
        raise RuntimeError(f"{len(results)} answers for {len(sent)} tasks")
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks failed, e.g. {failed[0].error}")
    if workload == "shared":
        for r in results[:3]:
            first, _, stop = sent[r.index].partition(b":")
            # Sum of arange(first, stop): the shared data is arange over int64.
            want = (int(first) + int(stop) - 1) * (int(stop) - int(first)) // 2
            if int(r.value()) != want:
                raise RuntimeError(f"shared task {r.index}: {r.value()!r} != {want}")
    elif workload == "noop":
        for r in results[:3]:
            if r.value() != sent[r.index]:
                raise RuntimeError(f"noop task {r.index} answered {r.value()!r}")


async def measure_row(
    client: AsyncClient,
    case: Case,
    batch_size: int,
    dev: systems.DevServer,
    sampler: systems.PssSampler,
    budget: Budget,
    shared: bytes | None,
    tasks: int | None = None,
) -> dict[str, Any]:
    """One row; ``tasks``: how many to time (default: :data:`TASKS` times the budget's scale)."""
    if tasks is None:
        tasks = int(TASKS[case.workload][batch_size] * budget.task_scale)
    n = max(batch_size, tasks)
    fetches_before = dev.stats()["get_shared_data_calls"]
    # Shared data is fetched (and copied) during set-up and warm-up: sample often then,
    # so the transient peak is seen for every system, not by luck.
    sampler.interval_s = FAST_SAMPLE_S
    sampler.reset()
    session = await client.create_session(app_id=f"bench-{case.workload}-{batch_size}")
    try:
        if shared is not None:
            await session.set_shared_data(shared, ttl_s=None)
        # Warm-up: every worker bound and busy once, shared data fetched, code paths hot.
        warm = min(n // 2, max(2 * case.workers * batch_size, n // 10))
        if shared is not None:
            # A worker takes up to a window (10) of batches at once: enough batches
            # that every worker gets one, so each has fetched before measuring.
            warm = WINDOW * case.workers * batch_size
        warm_payloads = payloads(case.workload, max(warm, batch_size), start=n)
        check_results(
            case.workload, warm_payloads, await session.run(warm_payloads, batch_size=batch_size)
        )
        sampler.sample()
        sampler.interval_s = SAMPLE_S
        sent = payloads(case.workload, n)
        started = time.perf_counter()
        results = await session.run(sent, batch_size=batch_size, timeout_s=600)
        elapsed_s = time.perf_counter() - started
        check_results(case.workload, sent, results)
        tasks_per_s = n / elapsed_s
        rounds = int(budget.latency_s / max(batch_size / tasks_per_s, 1e-6))
        rounds = max(budget.min_rounds, min(budget.max_rounds, rounds))
        one = payloads(case.workload, batch_size, start=2 * n)
        latencies_s = []
        for _ in range(rounds):
            t = time.perf_counter()
            answered = await session.run(one, batch_size=batch_size, timeout_s=600)
            latencies_s.append(time.perf_counter() - t)
            check_results(case.workload, one, answered)
        peak_mb = sampler.peak_mb
    finally:
        await session.close()
    fetches = dev.stats()["get_shared_data_calls"] - fetches_before
    return make_row(case, batch_size, tasks_per_s, latencies_s, peak_mb, fetches)


@contextlib.contextmanager
def deploy(
    case: Case, dev: systems.DevServer, api_key: str, log: IO[str]
) -> Iterator[systems.Deployment]:
    handler = HANDLERS[case.workload]
    if case.system in CLUSTER_BRIDGES:
        bridges = CLUSTER_BRIDGES[case.system]
        with systems.bridge_cluster(
            case.workers, handler, dev, api_key, MAX_MESSAGE_BYTES, log, bridges=bridges
        ) as d:
            yield d
    elif case.system in BRIDGE_PATHS:
        path = BRIDGE_PATHS[case.system]
        with systems.bridge(
            case.workers, handler, dev, api_key, MAX_MESSAGE_BYTES, log, data_path=path
        ) as d:
            yield d
    else:
        n = 1 if case.system == "reference" else case.workers
        with systems.reference_workers(n, handler, dev, api_key, MAX_MESSAGE_BYTES, log) as d:
            yield d


def connect(dev: systems.DevServer, api_key: str) -> AsyncClient:
    """A client of ``dev`` whose messages may carry the 256 MB shared data."""
    return AsyncClient(
        dev.queue, dev.central_cache, api_key=api_key, max_message_bytes=MAX_MESSAGE_BYTES
    )


def run_case(
    case: Case, budget: Budget, log: IO[str], shared: bytes | None
) -> list[dict[str, Any]]:
    api_key = secrets.token_hex(16)
    rows = []
    with (
        systems.devserver(api_key, MAX_MESSAGE_BYTES, log) as dev,
        deploy(case, dev, api_key, log) as dep,
        systems.PssSampler(lambda: dep.root_pids, SAMPLE_S) as sampler,
    ):

        async def measure() -> None:
            async with connect(dev, api_key) as client:
                for batch_size in case.batch_sizes:
                    row = await measure_row(client, case, batch_size, dev, sampler, budget, shared)
                    dep.check_alive()
                    row = annotate(row, dev)
                    rows.append(row)
                    print(format_row(row), flush=True)

        asyncio.run(measure())
    return rows


def annotate(row: dict[str, Any], dev: systems.DevServer) -> dict[str, Any]:
    """A cluster system's row with the node names its logical workers registered under."""
    if row["system"] in CLUSTER_BRIDGES:
        return {**row, "worker_nodes": dev.stats()["worker_nodes"]}
    return row


# --- output ----------------------------------------------------------------------

COLUMNS = (
    ("system", "{}"),
    ("workload", "{}"),
    ("batch_size", "{}"),
    ("workers", "{}"),
    ("tasks_per_s", "{:,.0f}"),
    ("p50_batch_ms", "{:.2f}"),
    ("p99_batch_ms", "{:.2f}"),
    ("peak_pss_mb", "{:,.0f}"),
    ("shared_fetches", "{}"),
)


def format_row(row: dict[str, Any]) -> str:
    text = "  ".join(f"{k}={fmt.format(row[k])}" for k, fmt in COLUMNS)
    if "worker_nodes" in row:
        text += f"  worker_nodes={json.dumps(row['worker_nodes'])}"
    return text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(k for k, _ in COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i, _ in enumerate(COLUMNS)) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[k]) for k, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Tasks/s against batch size per workload; for the shared workload, peak PSS
    and tasks/s against the number of workers. One colour per system everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, str]] = [
        (w, "batch_size", "tasks_per_s") for w in ("noop", "cpu") if _has(rows, w)
    ]
    if _has(rows, "shared"):
        panels += [("shared", "workers", "peak_pss_mb"), ("shared", "workers", "tasks_per_s")]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    styles = ("-", "--", ":", "-.")
    for ax, (workload, x_key, y_key) in zip(axes[0], panels, strict=True):
        lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for r in rows:
            if r["workload"] != workload:
                continue
            # Against batch size: a line per (system, K); against K: per (system, batch).
            group = r["workers"] if x_key == "batch_size" else r["batch_size"]
            lines.setdefault((r["system"], group), []).append((r[x_key], r[y_key]))
        groups = sorted({g for _, g in lines})
        for (system, group), points in sorted(lines.items()):
            points.sort()
            xs, ys = zip(*points, strict=True)
            label = f"{system} K={group}" if x_key == "batch_size" else f"{system} batch {group}"
            ax.plot(
                xs,
                ys,
                marker="o",
                color=COLOURS.get(system, "black"),
                linestyle=styles[groups.index(group) % len(styles)],
                label=label,
            )
        if x_key == "batch_size":
            ax.set_xscale("log")
            ax.set_xlabel("batch size (tasks)")
        else:
            ax.set_xlabel("actors / replicas (K)")
        if y_key == "tasks_per_s":
            ax.set_yscale("log")
            ax.set_ylabel("tasks/s")
        else:
            ax.set_ylabel("peak memory, PSS (MB)")
        ax.set_title(f"{workload}: {'tasks/s' if y_key == 'tasks_per_s' else 'memory'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _has(rows: list[dict[str, Any]], workload: str) -> bool:
    return any(r["workload"] == workload for r in rows)


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    out.write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown_table(rows))
    plot(rows, out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced matrix (~4 min, 2 cores)")
    p.add_argument("--out", default="results.json", help="JSON rows; .md and .png beside it")
    p.add_argument("--only", default=None, help="run only cases of SYSTEM[:WORKLOAD[:K]]")
    g = p.add_argument_group("interleaved rounds (benchmarks/interleave.py)")
    g.add_argument("--interleave", type=int, default=0, metavar="N", help="N rounds of --systems")
    g.add_argument("--systems", default="reference,bridge,bridge-cluster", help="comma-separated")
    g.add_argument("--workload", default="noop", choices=sorted(HANDLERS))
    g.add_argument("--batches", default="1,100,1000", help="batch sizes, comma-separated")
    g.add_argument("--workers", type=int, default=1, help="K of every system (default: 1)")
    g.add_argument("--min-row-s", type=float, default=3.0, help="seconds of work per row (3)")
    args = p.parse_args(argv)
    if args.interleave:
        # Imported here: interleave.py builds on this module's rows and deployments.
        from benchmarks import interleave

        return interleave.main(args)
    cases = quick_cases() if args.quick else full_cases()
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    if args.only:
        want = args.only.split(":")
        cases = [c for c in cases if [c.system, c.workload, str(c.workers)][: len(want)] == want]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.mkdtemp(prefix="alpcrun-bench-")) / "systems.log"
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {len(cases)} cases; "
        f"system logs: {log_path}",
        flush=True,
    )
    started = time.perf_counter()
    shared = shared_data() if any(c.workload == "shared" for c in cases) else None
    rows: list[dict[str, Any]] = []
    with open(log_path, "a") as log:
        for case in cases:
            for part in deployments(case):
                t = time.perf_counter()
                rows += run_case(part, budget, log, shared if part.workload == "shared" else None)
                print(
                    f"# {part.system} K={part.workers} {part.workload}: "
                    f"{time.perf_counter() - t:.1f} s",
                    flush=True,
                )
                write_outputs(rows, out)  # partial results survive a failure later on
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out}", flush=True)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
