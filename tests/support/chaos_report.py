"""What a chaos run (``tests/support/chaos_cluster.py``) reports at its end: the
figures (the ``RESULT`` line's JSON), the memory growth of its long-lived
processes, and the checks that must hold after every run."""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import Any

from tests.support.chaos_plan import MIN_FAULTS, MINIMUMS, lost_deliveries

PROCESS_WARM_UP_S = 60.0  # and each process from its own first minute on
WARM_UP = 0.2  # memory is compared from this fraction of the progress on


def figures(
    run: Any, end: dict[str, Any], stats: dict[str, Any], left: dict[int, str]
) -> dict[str, Any]:
    status = end["status"]
    t = run.tally
    restarts = {
        "actor restarts": int(status.get("actor_restarts", 0)),
        "node bridges replaced": int(status.get("bridges_replaced", 0)),
        "registrations (queue manager)": int(stats.get("workers_registered", 0)),
        "redeliveries": int(stats.get("redeliveries", 0)),
        "results dropped": int(stats.get("dropped_results", 0)),
    }
    faults = run.faults + t.faults
    memory = memory_growth(run.samples, run.roles)
    result: dict[str, Any] = {
        "seed": run.plan.seed,
        "wall_s": round(run.now(), 1),
        "faults_injected": dict(faults),
        "faults_total": sum(faults.values()),
        "tasks": len(t.sent),
        "sessions_closed": len(t.closed_sessions),
        "outcomes": dict(t.outcomes),
        "lost": t.lost,
        "lost_examples": t.lost_examples(),
        "doubled": t.doubled,
        "doubled_seen_by_client": t.ignored,
        "doubled_examples": t.doubled_examples(),
        "by_kind": dict(t.by_kind),
        "log_dir": run.mark_dir,
        "wrong": t.wrong[:20],
        "wrong_count": len(t.wrong),
        "dead_lettered": dict(t.dead_reasons),
        "collateral_errors": dict(t.errors),
        "restarts": restarts,
        "memory": memory,
        "notes": dict(run.notes),
        "serving_again_s": run.recoveries,
        "not_serving_again": [f"{n} ({why})" for n, why, _, _ in run.recovering],
        "bridge_exit": end["bridge_exit"],
        "actors_alive": end["actors_alive"],
        "processes_left": end["processes_left"] + sorted(left.values()),
        "fault_log": run.fault_log,
        "stall_report": run.stall_lines,
    }
    log_path = os.path.join(run.mark_dir, "services.log")
    with contextlib.suppress(OSError), open(log_path) as f:
        result["lost_deliveries"] = lost_deliveries(f.read().splitlines())
    result["failed_checks"] = failed_checks(result)
    return result


def failed_checks(r: dict[str, Any]) -> list[str]:
    """What must hold after every run."""
    out = []
    if r["lost"] or r["doubled"]:
        out.append(f"lost {r['lost']}, doubled {r['doubled']}")
    if r["wrong_count"]:
        out.append(f"{r['wrong_count']} answer(s) of another task, session or level")
    if r["faults_total"] < MIN_FAULTS:
        out.append(f"only {r['faults_total']} faults injected")
    for kind, least in MINIMUMS.items():
        if r["faults_injected"].get(kind, 0) < least:
            out.append(f"{kind}: {r['faults_injected'].get(kind, 0)} < {least}")
    if r["notes"].get("stalled"):
        out.append("the run stalled")
    if r["actors_alive"] or r["processes_left"]:
        out.append(f"left behind: {r['actors_alive']} {r['processes_left']}")
    for m in r["memory"]:
        if m["growth"] >= 0.10:
            out.append(f"{m['role']} pid {m['pid']} grew {m['growth'] * 100:.1f} %")
    if not r["memory"]:
        out.append("no long-lived process sampled")
    return out


def memory_growth(
    samples_of: dict[int, list[tuple[float, float, int]]], roles: dict[int, str]
) -> list[dict[str, Any]]:
    """Growth of each long-lived process from the first samples after warm-up
    (and after its own first PROCESS_WARM_UP_S) to its last: medians of five
    samples each. A process whose sampled span after that is under 60 s is not
    judged: node bridges replaced during the run are new processes, and one
    under a minute old is still filling up (a CI run saw one go 126 -> 144 MB,
    where the others stood, in its first 30 s; a long run one go 110 -> 130 MB
    in its first 57 s, then 130 -> 133 MB over the next 3 minutes)."""
    out = []
    for pid, samples in samples_of.items():
        born = samples[0][0]
        after = [s for s in samples if s[1] >= WARM_UP and s[0] - born >= PROCESS_WARM_UP_S]
        if len(after) < 20 or after[-1][0] - after[0][0] < 60:
            continue
        start = statistics.median(kb for _, _, kb in after[:5]) / 1024
        end = statistics.median(kb for _, _, kb in after[-5:]) / 1024
        span_s = after[-1][0] - after[0][0]
        step = max(1, len(samples) // 12)
        series = [[round(t), round(kb / 1024, 1)] for t, _, kb in samples[::step]]
        out.append({"role": roles[pid], "pid": pid, "start_mb": start, "end_mb": end,
                    "growth": end / start - 1, "span_s": span_s, "series": series})  # fmt: skip
    return sorted(out, key=lambda m: (str(m["role"]), -float(m["span_s"])))
