"""The seeded plan of a cluster chaos run and the tally of its answers: pure
Python, no Ray, no gRPC (``tests/support/chaos_cluster.py`` runs it;
``tests/unit/test_chaos_tally.py`` checks that the tally catches what it must).

A plan is drawn from one seed: the kind of every task of every lane (sessions
run one after another in a lane) and the faults, each at a point of the run's
progress (a fraction of all tasks answered), so that the same seed injects the
same faults in the same order however fast the machine is.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

# Faults at a point of the progress; ``count`` at scale 1 (``--scale`` multiplies them).
HEAVY = {
    "actor killed": 24,  # SIGKILL of a pool actor's process
    "node replaced": 3,  # a worker raylet removed (ungraceful), another added
    "node bridge killed": 3,  # SIGKILL of a node bridge's process
    "link cut": 11,  # the bridges' connections to the queue manager down 1-3 s
    "node cache outage": 4,  # the node cache unreachable 1-3 s
    "session closed": 3,  # CloseSession while its batches run
    "lull": 5,  # every lane but one pauses: the elastic pool shrinks under load
}
CHEAP = {
    "stream aborted": 80,  # the queue manager ends a WorkerStream (UNAVAILABLE)
    "registration aborted": 20,  # ... a WorkerUpdate
}
# What every run must have injected at least (scale 1).
MINIMUMS = {
    "node replaced": 3,
    "node bridge killed": 3,
    "link cut": 10,
    "actor killed": 20,
    "scale-down under load": 2,
}
MIN_FAULTS = 1000

# Task kinds: share of "raise"/"garbage"; counts per lane of "hang"/"exit".
RAISE_SHARE = 0.12
GARBAGE_SHARE = 0.03
HANGS_PER_LANE = 3
EXITS_PER_LANE = 4


@dataclass(frozen=True)
class Fault:
    at: float  # fraction of all tasks answered
    kind: str
    seconds: float = 0.0  # how long an outage lasts
    pick: int = 0  # seeds the choice of victim


@dataclass(frozen=True)
class Plan:
    seed: int
    lanes: list[list[str]]  # kinds of every task, per lane
    faults: list[Fault]

    @property
    def tasks(self) -> int:
        return sum(len(k) for k in self.lanes)


def make_plan(seed: int, scale: float = 1.0, lanes: int = 4, tasks_per_lane: int = 1700) -> Plan:
    rng = random.Random(seed)
    n = max(100, int(tasks_per_lane * scale))
    kinds = [_lane_kinds(rng, n, scale) for _ in range(lanes)]
    faults: list[Fault] = []
    for table in (HEAVY, CHEAP):
        for kind, count in table.items():
            for _ in range(max(1, round(count * scale))):
                lo, hi = (0.1, 0.8) if kind in ("session closed", "lull") else (0.04, 0.92)
                seconds = rng.uniform(1.0, 3.0) if kind in ("link cut", "node cache outage") else 0
                faults.append(Fault(rng.uniform(lo, hi), kind, seconds, rng.randrange(1 << 30)))
    faults.sort(key=lambda f: f.at)
    return Plan(seed, kinds, faults)


def scale_for_faults(seed: int, faults: int) -> float:
    """The ``--scale`` at which a run of ``seed`` plans about ``faults`` faults
    (the planned ones and the tasks that raise, hang, crash or are garbage)."""
    plan = make_plan(seed, 1.0)
    per_scale = len(plan.faults) + sum(k != "ok" for lane in plan.lanes for k in lane)
    return faults / per_scale


def _lane_kinds(rng: random.Random, n: int, scale: float) -> list[str]:
    out = []
    for _ in range(n):
        x = rng.random()
        out.append(
            "raise" if x < RAISE_SHARE else "garbage" if x < RAISE_SHARE + GARBAGE_SHARE else "ok"
        )
    first = n // 20  # none of the costly ones while the pool warms up
    special = rng.sample(range(first, n), round((HANGS_PER_LANE + EXITS_PER_LANE) * scale))
    hangs = round(HANGS_PER_LANE * scale)
    for i, at in enumerate(special):
        out[at] = "hang" if i < hangs else "exit"
    return out


def payload(kind: str, tag: str, index: int, mark_dir: str, nap_ms: int) -> bytes:
    """The task's payload for ``tests.support.chaos_handlers:tagged``."""
    name = f"{tag}/{index}"
    if kind == "ok":
        return f"ok:{name}:{nap_ms}".encode()
    if kind == "exit":
        return f"exit:{name}:{mark_dir}/{tag}-{index}".encode()
    if kind == "garbage":
        return b"\xff" + f"garbage;{name}".encode()
    return f"{kind}:{name}".encode()


def task_of(payload: bytes) -> tuple[str, int] | None:
    """(session tag, task index) named by a payload (a dead letter carries it)."""
    m = re.match(rb"^(?:\xff)?[a-z]+[:;]([^/:]+)/(\d+)", payload)
    return (m.group(1).decode(), int(m.group(2))) if m else None


def reason_of(error: str) -> str:
    """A dead letter's reason, without its numbers and ids (for the table)."""
    text = error.split(" (", 1)[0] if "closed before" in error else error
    text = re.sub(r"session [0-9A-Z]{20,}", "session S", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:90]


@dataclass
class Task:
    kind: str
    index: int  # in its lane
    level: int  # the shared-data level its batch asked for


@dataclass
class Tally:
    """Every task sent and the answers it got; ``check`` classifies them."""

    sent: dict[tuple[str, int], Task] = field(default_factory=dict)  # (tag, index) -> task
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    dead_reasons: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # unexpected ones, by text
    wrong: list[str] = field(default_factory=list)  # answers that belong to another task
    closed_sessions: set[str] = field(default_factory=set)
    faults: Counter[str] = field(default_factory=Counter)  # task faults that were hit
    ignored: int = 0  # answers the client saw again (it passes each task's first only)
    by_kind: Counter[str] = field(default_factory=Counter)  # "kind: outcome"
    trail: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # answers, in order

    def send(self, tag: str, task: Task) -> None:
        self.sent[(tag, task.index)] = task

    def answer(
        self, tag: str, index: int, payload: bytes | None, error: str | None, dead: bool
    ) -> None:
        key = (tag, index)
        task = self.sent.get(key)
        if task is None:
            self.wrong.append(f"answer for a task never sent: {key}")
            return
        self.answers[key] += 1
        what = "dead" if dead else "result" if error is None else "error"
        self.trail.setdefault(key, []).append(f"{what}: {(error or '')[:80]}")
        if self.answers[key] > 1:
            return  # counted as doubled
        self.by_kind[f"{task.kind}: {what}"] += 1
        if dead:
            self.outcomes["dead-lettered"] += 1
            self.dead_reasons[reason_of(error or "")] += 1
            return
        name = f"{tag}/{index}"
        if error is None:
            expected = f"{name}|{tag}:L{task.level}".encode()
            if payload != expected:
                self.wrong.append(f"{name} ({task.kind}, level {task.level}) answered {payload!r}")
            elif task.kind not in ("ok", "exit"):
                self.wrong.append(f"{name} ({task.kind}) answered as if it were ok")
            else:
                self.outcomes["result"] += 1
                if task.kind == "exit":
                    self.faults["crashing task"] += 1
            return
        if "asked to raise" in error:
            if task.kind != "raise" or f"asked to raise: {name}" not in error:
                self.wrong.append(f"{name} ({task.kind}) answered another task's error {error!r}")
                return
            self.outcomes["handler error"] += 1
            self.faults["raising task"] += 1
        elif "garbage payload" in error:
            if task.kind != "garbage":
                self.wrong.append(f"{name} ({task.kind}) answered another task's error {error!r}")
                return
            self.outcomes["handler error"] += 1
            self.faults["garbage task"] += 1
        elif task.kind == "hang" and "timed out" in error:
            self.outcomes["timed out (hang)"] += 1
            self.faults["hanging task"] += 1
        else:
            # An innocent task failed for a fault it did not cause.
            self.outcomes["collateral error"] += 1
            self.errors[reason_of(error)] += 1

    @property
    def lost(self) -> int:
        return sum(1 for key in self.sent if self.answers[key] == 0)

    @property
    def doubled(self) -> int:
        return sum(c - 1 for c in self.answers.values() if c > 1) + self.ignored

    def lost_examples(self, n: int = 5) -> list[str]:
        return [f"{t}/{i}" for (t, i) in self.sent if self.answers[(t, i)] == 0][:n]

    def doubled_examples(self, n: int = 5) -> list[str]:
        twice = [k for k, c in self.answers.items() if c > 1][:n]
        return [f"{t}/{i}: {self.trail.get((t, i))}" for t, i in twice]


def outcome_table(
    seed: int,
    faults: Counter[str],
    tally: Tally,
    restarts: dict[str, int],
    memory: list[dict[str, object]],
    wall_s: float,
) -> str:
    """The table printed at the end of a run."""
    lines = [f"CHAOS OUTCOME seed={seed} wall={wall_s:.0f} s"]
    total = sum(faults.values())
    lines.append(f"  faults injected: {total}")
    for kind, count in sorted(faults.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {kind:<28}{count:>7}")
    lines.append(f"  tasks: {len(tally.sent)} sent in {len(tally.closed_sessions)} closed and "
                 f"other sessions")  # fmt: skip
    for name, count in sorted(tally.outcomes.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {name:<28}{count:>7}")
    lines.append(f"    {'lost':<28}{tally.lost:>7}")
    lines.append(f"    {'doubled':<28}{tally.doubled:>7}")
    lines.append(f"    {'wrong payload or level':<28}{len(tally.wrong):>7}")
    if tally.dead_reasons:
        lines.append("  dead-lettered, by reason:")
        for reason, count in tally.dead_reasons.most_common():
            lines.append(f"    {count:>7}  {reason}")
    if tally.errors:
        lines.append("  collateral errors, by reason:")
        for reason, count in tally.errors.most_common():
            lines.append(f"    {count:>7}  {reason}")
    lines.append("  restarts:")
    for name, count in restarts.items():
        lines.append(f"    {name:<28}{count:>7}")
    lines.append("  memory (VmRSS after warm-up, MB):")
    for m in memory:
        lines.append(
            f"    {m['role']:<14} pid {m['pid']:<8} {m['start_mb']:>7.1f} -> {m['end_mb']:>7.1f}"
            f"  {m['growth'] * 100:+.1f} % over {m['span_s']:.0f} s"
        )
    return "\n".join(lines)


def lost_deliveries(lines: list[str]) -> dict[str, dict[str, int]]:
    """Why batches went back to the queue, from the queue manager's log (DEBUG):
    every delivery that ended without an answer, by the cause before it, overall
    and for the batches dead-lettered "delivered N times"."""
    cause: dict[str, str] = {}  # worker id -> the last fault or UNBIND seen for it
    history: dict[str, list[str]] = {}
    overall: Counter[str] = Counter()
    for line in lines:
        if m := re.search(r"worker (\w+): stream of session \w+ aborted", line):
            cause[m.group(1)] = "stream aborted by the queue manager"
        elif m := re.search(r"worker (\w+): registration aborted", line):
            cause[m.group(1)] = "registration aborted by the queue manager"
        elif m := re.search(r"UNBIND worker (\w+) from session \w+: (.*)", line):
            cause[m.group(1)] = "bridge ended the stream" if "ended" in m.group(2) else "UNBIND"
        elif m := re.search(r"worker (\w+) left session \w+ with .* re-queued \((.*)\)", line):
            why = cause.pop(m.group(1), "bridge ended the stream or its registration")
            for batch in m.group(2).split():
                history.setdefault(batch, []).append(why)
                overall[why] += 1
        elif m := re.search(r"batch (\S+) of session .* dead-lettered: delivered", line):
            history.setdefault(m.group(1), []).append("DEAD")
    dead = [h for h in history.values() if "DEAD" in h]
    among = Counter(why for h in dead for why in h if why != "DEAD")
    return {"all": dict(overall), "of_dead_lettered": dict(among), "batches": {"dead": len(dead)}}
