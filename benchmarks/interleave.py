"""Interleaved rounds: systems measured in turn, round after round, so that the
drift of a shared machine falls on all of them alike; medians with their ranges.

    python benchmarks/run.py --interleave 3 --systems reference,bridge,bridge-cluster \\
        --workload noop --batches 1,100,1000 --out benchmarks/out/interleaved.json

Every system gets one deployment (its own devserver process, as in ``run.py``),
started once and kept for every row. Per batch size: a calibration on every system
(doubling runs until one takes ``CALIBRATION_S``; also a warm-up), then the row size
for that batch size, the same for every system: enough tasks for ``--min-row-s``
seconds at the fastest calibrated rate (the others take longer; a row that still
ran shorter, the machine being faster than at calibration, makes the later rows
of that batch size longer, and the row records its ``elapsed_s``); then the rounds,
``reference, bridge, bridge-cluster, reference, bridge, ...``, each row a fresh
session measured as ``run.py`` measures one. Prints, per system and batch size, the
median tasks/s with its range (min-max), and ratios between systems: one ratio per
round (both systems measured in that round), then their median and range. Writes
the rows (``run.py``'s, plus ``round``, ``tasks`` and ``elapsed_s``) as JSON to ``--out`` and the
summary tables to ``<out>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import run, systems

# Ratios printed when both systems are measured: (numerator, denominator).
RATIOS = (
    ("bridge", "reference"),
    ("bridge-cluster", "reference"),
    ("bridge-cluster", "bridge"),
    ("bridge-cluster", "bridge-cluster-one"),
)
CALIBRATION_S = 1.0  # a calibration run at least this long gives the rate
ROW_MARGIN = 1.3  # rows sized for this much more than --min-row-s at the calibrated rate
# Idle-latency rounds of an interleaved row: short, the rows are about throughput.
BUDGET = run.Budget(latency_s=0.5, min_rounds=5, max_rounds=20)


# --- pure helpers (tests/unit/test_benchmark_interleave.py) -------------------------


def order(systems_: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, system) in the order measured: every system in turn, round after round."""
    return [(r, s) for r in range(rounds) for s in systems_]


@dataclass(frozen=True)
class Spread:
    """The median of some values with their range."""

    median: float
    low: float
    high: float
    count: int

    def format(self, fmt: str = "{:,.0f}") -> str:
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}-{fmt.format(self.high)})"


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def rates(rows: Sequence[dict[str, Any]], system: str, batch: int) -> dict[int, float]:
    """Tasks/s of ``system`` at ``batch`` by round."""
    return {
        r["round"]: r["tasks_per_s"]
        for r in rows
        if r["system"] == system and r["batch_size"] == batch
    }


def ratio_spread(
    rows: Sequence[dict[str, Any]], numerator: str, denominator: str, batch: int
) -> Spread | None:
    """``numerator / denominator`` per round where both were measured, then their
    spread; None when no round has both."""
    top, bottom = rates(rows, numerator, batch), rates(rows, denominator, batch)
    ratios = [top[r] / bottom[r] for r in sorted(set(top) & set(bottom)) if bottom[r] > 0]
    return spread(ratios) if ratios else None


def row_tasks(rate_per_s: float, min_row_s: float, batch: int) -> int:
    """Tasks for a row of at least ``min_row_s`` at ``rate_per_s`` (with a margin), in
    whole batches."""
    batches = math.ceil(rate_per_s * min_row_s * ROW_MARGIN / batch)
    return max(1, batches) * batch


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: tasks/s per system and batch size, then the ratios, as median (range)."""
    batches = sorted({r["batch_size"] for r in rows})
    names = list(dict.fromkeys(r["system"] for r in rows))
    head = "| " + " | ".join(f"batch {b}" for b in batches) + " |"
    rule = "|---|" + "---:|" * len(batches)
    lines = ["tasks/s, median (min-max) over rounds:", "", "| system " + head, rule]
    for name in names:
        cells = []
        for b in batches:
            got = list(rates(rows, name, b).values())
            cells.append(f"{spread(got).format()} x{len(got)}" if got else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio_lines = []
    for top, bottom in RATIOS:
        if top in names and bottom in names:
            cells = []
            for b in batches:
                s = ratio_spread(rows, top, bottom, b)
                cells.append(s.format("{:.2f}") if s else "")
            ratio_lines.append(f"| {top} / {bottom} | " + " | ".join(cells) + " |")
    if ratio_lines:
        lines += ["", "ratios, median (min-max) of the per-round ratios:", ""]
        lines += ["| ratio " + head, rule, *ratio_lines]
    return "\n".join(lines) + "\n"


# --- running ------------------------------------------------------------------------


async def calibrate(
    client: Any, case: run.Case, batch: int, shared: bytes | None, target_s: float
) -> float:
    """Tasks/s of one session's runs, doubled until one takes ``target_s``."""
    session = await client.create_session(app_id=f"calibrate-{case.system}-{batch}")
    try:
        if shared is not None:
            await session.set_shared_data(shared, ttl_s=None)
        n = 4 * batch
        while True:
            sent = run.payloads(case.workload, n)
            started = time.perf_counter()
            results = await session.run(sent, batch_size=batch, timeout_s=600)
            elapsed_s = time.perf_counter() - started
            run.check_results(case.workload, sent, results)
            if elapsed_s >= target_s:
                return n / elapsed_s
            n *= 2 if elapsed_s > target_s / 4 else 4
    finally:
        await session.close()


async def measure(
    args: argparse.Namespace,
    cases: list[run.Case],
    deps: dict[str, tuple[systems.DevServer, systems.Deployment]],
    api_key: str,
    shared: bytes | None,
    out: Path,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for case in cases:
            dev = deps[case.system][0]
            clients[case.system] = await stack.enter_async_context(run.connect(dev, api_key))
        for batch in cases[0].batch_sizes:
            calibrated = {}
            for case in cases:
                client = clients[case.system]
                rate = await calibrate(client, case, batch, shared, CALIBRATION_S)
                calibrated[case.system] = rate
            n = row_tasks(max(calibrated.values()), args.min_row_s, batch)
            rates_text = ", ".join(f"{s} {v:,.0f}" for s, v in calibrated.items())
            print(f"# batch {batch}: calibrated tasks/s {rates_text}; {n} tasks a row", flush=True)
            by_system = {c.system: c for c in cases}
            for round_, name in order([c.system for c in cases], args.interleave):
                dev, dep = deps[name]
                with sampler_of(dep) as sampler:
                    row = await run.measure_row(
                        clients[name], by_system[name], batch, dev, sampler, BUDGET, shared, n
                    )
                dep.check_alive()
                elapsed_s = n / row["tasks_per_s"]
                row = {**run.annotate(row, dev), "round": round_, "tasks": n,
                       "elapsed_s": round(elapsed_s, 2)}  # fmt: skip
                rows.append(row)
                text = run.format_row(row)
                print(f"round {round_}  {text}  elapsed_s={elapsed_s:.1f}", flush=True)
                if elapsed_s < args.min_row_s:
                    n = row_tasks(row["tasks_per_s"], args.min_row_s, batch)
                    print(f"# under {args.min_row_s:g} s: {n} tasks a row from now on", flush=True)
                save(rows, out)  # partial rows survive a failure later on
    return rows


def sampler_of(dep: systems.Deployment) -> systems.PssSampler:
    """A PSS sampler of ``dep``'s processes, run only during its own rows."""
    return systems.PssSampler(lambda: dep.root_pids, run.SAMPLE_S)


def save(rows: list[dict[str, Any]], out: Path) -> None:
    out.write_text(json.dumps(rows, indent=1) + "\n")


def main(args: argparse.Namespace) -> int:
    names = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(names) - set(run.SYSTEMS))
    if unknown or len(set(names)) != len(names):
        raise SystemExit(f"--systems: unknown or repeated {unknown or names}; know {run.SYSTEMS}")
    batches = tuple(int(b) for b in args.batches.split(","))
    cases = [run.Case(name, args.workload, args.workers, batches) for name in names]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.mkdtemp(prefix="alpcrun-bench-")) / "systems.log"
    print(
        f"{args.interleave} interleaved rounds of {', '.join(names)}; {args.workload}, "
        f"K={args.workers}, batches {batches}; {args.min_row_s:g} s a row; "
        f"system logs: {log_path}",
        flush=True,
    )
    if any(c.system in run.CLUSTER_BRIDGES for c in cases):
        knows = systems.cli_knows_bridges()
        print(f"# the bridge CLI {'knows' if knows else 'has no'} --bridges", flush=True)
        flagged = [n for n in names if run.CLUSTER_BRIDGES.get(n) is not None]
        if flagged and not knows:
            raise SystemExit(f"{', '.join(flagged)}: this bridge CLI has no --bridges flag")
    started = time.perf_counter()
    api_key = secrets.token_hex(16)
    shared = run.shared_data() if args.workload == "shared" else None
    with open(log_path, "a") as log, contextlib.ExitStack() as stack:
        deps = {}
        for case in cases:
            t = time.perf_counter()
            dev = stack.enter_context(systems.devserver(api_key, run.MAX_MESSAGE_BYTES, log))
            deps[case.system] = (dev, stack.enter_context(run.deploy(case, dev, api_key, log)))
            print(f"# {case.system} up in {time.perf_counter() - t:.1f} s", flush=True)
        rows = asyncio.run(measure(args, cases, deps, api_key, shared, out))
    table = summary(rows)
    out.with_suffix(".md").write_text(table)
    print(f"total {time.perf_counter() - started:.0f} s; wrote {out}\n", flush=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit("run it as: python benchmarks/run.py --interleave N ...")
