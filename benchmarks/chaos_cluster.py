"""Chaos from outside: the bridge CLI deployed as a user deploys it, faults at random.

    python benchmarks/chaos_cluster.py --seed 7                 # ~5 min on 2 cores
    python benchmarks/chaos_cluster.py --seed 7 --faults 20000  # the long (nightly) mode
    python benchmarks/chaos_cluster.py --recovery 5             # recovery times only

The deployment (every part a process of its own, as in production):

* a Ray cluster of raylets on this machine (``cluster_host.py``): a head with 0 CPUs
  and ``--nodes`` worker nodes, each started with its own ``METALCORE_WORKER_NODE``;
* the local queue manager and caches (``devserver_stats.py``: the devserver plus
  the history this run reads: who answered when, which streams ended holding
  batches);
* a TCP proxy between the bridges and the queue manager (``--queue`` points at it;
  the clients talk to the queue manager directly), so that the link can be cut;
* ``python -m ray_alpcrun.bridge --ray-address <head> ...`` (``--bridges per-node``,
  the default) under a supervisor loop that starts it again whenever it exits,
  as systemd's ``Restart=always`` would;
* ``--sessions`` sessions of ``--tasks`` tasks each from the Python client
  (``AsyncClient``), every task sleeping ``--task-ms`` and answering its own payload.

Faults come at ``--rate`` a minute (exponential gaps, drawn from ``--seed``), each
of a kind drawn by weight: SIGKILL of a process of one of the job's actors (pool
actors, node bridges, the coordinator bridge actor: found by their Ray process
titles in the cluster's process tree), a worker node replaced (its raylet killed,
a fresh node added) and the queue-manager link cut for ``--cut-s`` seconds
(connections reset, new ones refused). The seed and every fault with its time are
printed; faults stop when the sessions are done, at ``--minutes`` or after
``--faults`` (with ``--faults`` the rounds of sessions repeat until that many were
injected). Then the run heals (link up, nodes back), waits for the last answers,
stops the CLI (SIGTERM: it drains) and prints the outcome table: faults by kind,
tasks, answered ok / failed, lost, doubled, dead-lettered (by reason), CLI restarts,
node-bridge replacements, the deliveries each kind of fault cost, and how long each
node took to answer again after a fault (``answered_after``: the first result batch
from that node's workers after the fault, as the queue manager saw it).

``--recovery K`` injects no random faults: K times each, it kills one node bridge,
then the coordinator bridge actor (a head-side process: the CLI exits and its
supervisor starts it again), then cuts the link for 3 s, each while the sessions run,
and measures the time until that node (or every node) answers a batch again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import systems
from tests.support.chaos_proxy import TcpProxy

ROOT = systems.ROOT
HANDLER = "benchmarks.sleep_handler:echo_sleep"
# Ray titles each actor's process "ray::<Class>..."; these are the job's.
ACTOR_KINDS = {"PoolActor": "pool-actor", "NodeBridge": "node-bridge", "Bridge": "coordinator"}
KINDS = ("kill", "node", "cut")
RESTART_S = 0.1  # systemd's RestartSec default
# A result written just before a kill may reach the queue manager a moment after it.
AFTER_S = 0.1


@dataclass
class Fault:
    t_s: float  # since the sessions started
    wall: float
    kind: str  # "kill <actor kind>", "node replaced", "link cut", "skipped ..."
    target: str
    nodes: list[str] = field(default_factory=list)  # whose next answer measures recovery
    since: float = 0.0  # wall time recovery counts from (the kill; the link's return)


class Supervisor(threading.Thread):
    """Runs the CLI and starts it again whenever it exits (``Restart=always``)."""

    def __init__(self, command: list[str], env: dict[str, str], log: IO[str]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.command, self.env, self.log = command, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[float] = []
        self.exits: list[tuple[float, int]] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = subprocess.Popen(
                    self.command, env=self.env, stdout=self.log, stderr=self.log,
                    start_new_session=True,
                )  # fmt: skip
                self.starts.append(time.time())
            code = self.proc.wait()
            self.exits.append((time.time(), code))
            self._stopping.wait(RESTART_S)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the CLI drains), SIGKILL after ``timeout_s``; its exit code."""
        with self._lock:
            self._stopping.set()
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.join(10)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return code


def job_actors(roots: list[int]) -> list[tuple[str, int, str]]:
    """(kind, pid, node) of the job's actor processes under ``roots``, sorted; ``node``
    is the ``METALCORE_WORKER_NODE`` the process has (``head`` without one)."""
    out = []
    for pid in systems.process_tree(roots):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, UnicodeDecodeError):
            continue
        if not title.startswith("ray::"):
            continue
        kind = ACTOR_KINDS.get(title[5:].split(".")[0].split()[0] if title[5:] else "")
        if kind is None:
            continue
        node = next(
            (e[22:].decode() for e in environ if e.startswith(b"METALCORE_WORKER_NODE=")), ""
        )
        out.append((kind, pid, node or "head"))
    return sorted(out)


class Tally:
    """What the client saw, updated as answers arrive (so a cut-off run still counts)."""

    def __init__(self) -> None:
        self.tasks = 0
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.dead: Counter[str] = Counter()
        self.doubled = 0
        self.wrong_payload = 0
        self.ignored = 0  # answers the client dropped as repeats or unknown
        self.answered = 0
        self.sessions_done = 0
        self.rounds = 0


async def one_session(dev: systems.DevServer, api_key: str, name: str, args: argparse.Namespace,
                      tally: Tally) -> None:  # fmt: skip
    from ray_alpcrun.client import AsyncClient

    payloads = [b"%s.%06d:%d" % (name.encode(), i, args.task_ms) for i in range(args.tasks)]
    tally.tasks += len(payloads)
    seen: Counter[int] = Counter()
    async with AsyncClient(dev.queue, dev.central_cache, api_key=api_key) as client:
        session = await client.create_session(app_id=name)
        try:
            async for chunk in session.submit_chunks(payloads, batch_size=args.batch_size):
                for r in chunk:
                    seen[r.index] += 1
                    if seen[r.index] > 1:
                        tally.doubled += 1
                        continue
                    tally.answered += 1
                    if r.ok:
                        tally.ok += 1
                        if r.payload != payloads[r.index]:
                            tally.wrong_payload += 1
                    elif r.dead:
                        tally.dead[reason(r.error)] += 1
                    else:
                        tally.failed[reason(r.error)] += 1
        finally:
            stream = getattr(session, "_stream", None)
            tally.ignored += int(getattr(stream, "ignored", 0))
            with suppress(Exception):
                await asyncio.wait_for(session.close(), 30)
    tally.sessions_done += 1


def reason(error: str | None) -> str:
    text = (error or "dead letter").splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


async def sessions(dev: systems.DevServer, api_key: str, args: argparse.Namespace, tally: Tally,
                   more: Callable[[], bool]) -> None:  # fmt: skip
    while True:
        names = [f"chaos-{tally.rounds}-{k}" for k in range(args.sessions)]
        await asyncio.gather(*(one_session(dev, api_key, n, args, tally) for n in names))
        tally.rounds += 1
        if not more():
            return


class Run:
    """One chaos run: the deployment, the fault loop, the record."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, log: IO[str]) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.api_key = secrets.token_hex(16)
        self.log = log
        self.dev = stack.enter_context(systems.devserver(self.api_key, 4 << 20, log))
        self.proxy = stack.enter_context(TcpProxy(self.dev.queue))
        t0 = time.monotonic()
        self.host = systems.ClusterHost(self.api_key, log, workers=args.nodes,
                                        worker_cpus=args.node_cpus)  # fmt: skip
        stack.callback(self.host.close)
        say(f"# cluster up in {time.monotonic() - t0:.1f} s: {self.host.address}, "
            f"nodes {sorted(self.host.nodes.values())}")  # fmt: skip
        self.next_node = args.nodes
        self.health_port = free_port()
        command = [sys.executable, "-m", "ray_alpcrun.bridge", "--handler", HANDLER,
                   "--ray-address", self.host.address, "--queue", self.proxy.address,
                   "--cache", self.dev.node_cache, "--actors", str(args.actors),
                   "--cpus-per-actor", "1", "--health-port", str(self.health_port),
                   "--log-level", args.log_level]  # fmt: skip
        self.cli = Supervisor(command, self.host.env, log)
        stack.callback(self.cli.stop)
        self.nodes_pool = ThreadPoolExecutor(1, thread_name_prefix="nodes")  # one at a time
        stack.callback(self.nodes_pool.shutdown)
        self.node_jobs: list[Future[Any]] = []
        self.faults: list[Fault] = []
        self.events: list[list[Any]] = []
        self.replaced: dict[int, int] = {}  # coordinator pid -> bridges_replaced
        self.restarts_seen: dict[int, int] = {}  # coordinator pid -> actor_restarts
        self.cut_until = 0.0
        self.ups: list[float] = []  # when the link came back up
        self.removing: set[str] = set()  # worker nodes whose replacement is queued
        self.start = 0.0

    # -- faults ------------------------------------------------------------------

    def inject(self, kind: str) -> Fault:
        now = time.time()
        t_s = now - self.start
        if kind == "kill":
            actors = job_actors([self.host.proc.pid])
            if not actors:
                return Fault(t_s, now, "skipped kill", "no actor alive")
            what, pid, node = actors[self.rng.randrange(len(actors))]
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            nodes = self.worker_nodes() if what == "coordinator" else [node]
            return Fault(t_s, now, f"kill {what}", f"pid {pid} on {node}", nodes, now)
        if kind == "node":
            # Not one whose replacement is queued already (the cluster host does one at a time).
            victims = sorted(
                (kv for kv in self.host.nodes.items() if kv[0] not in self.removing),
                key=lambda kv: kv[1],
            )
            if not victims:
                return Fault(t_s, now, "skipped node", "every node is being replaced")
            node_id, name = victims[self.rng.randrange(len(victims))]
            self.removing.add(node_id)
            fresh = f"bench-worker-{self.next_node}"
            self.next_node += 1
            self.node_jobs.append(self.nodes_pool.submit(self.replace_node, node_id, fresh))
            return Fault(t_s, now, "node replaced", f"{name} -> {fresh}", [fresh], now)
        cut_s = self.rng.uniform(*self.args.cut_s)
        self.proxy.down()
        self.cut_until = max(self.cut_until, now + cut_s)
        until = self.cut_until
        return Fault(t_s, now, "link cut", f"{cut_s:.1f} s", self.worker_nodes(), until)

    def replace_node(self, node_id: str, fresh: str) -> None:
        for answer in (self.host.command("remove", node_id), self.host.command("add", fresh)):
            if "error" in answer:
                say(f"# node replacement: {answer['error']}")

    def worker_nodes(self) -> list[str]:
        return sorted(self.host.nodes.values())

    def tick(self) -> None:
        """Every half second: the link back up when its cut ends; monitoring."""
        if self.cut_until and time.time() >= self.cut_until:
            self.link_up()
        self.events.extend(self.dev.ask("events"))
        status = read_status(self.health_port)
        if status is not None:
            pid = int(status.get("pid", 0))
            self.replaced[pid] = max(
                self.replaced.get(pid, 0), int(status.get("bridges_replaced", 0))
            )
            self.restarts_seen[pid] = max(self.restarts_seen.get(pid, 0),
                                          int(status.get("actor_restarts", 0)))  # fmt: skip

    def link_up(self) -> None:
        self.proxy.up()
        self.cut_until = 0.0
        self.ups.append(time.time())

    def heal(self) -> None:
        self.link_up()
        for job in self.node_jobs:
            job.result(timeout=120)

    # -- the run -------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 240.0) -> float:
        t0 = time.monotonic()
        want = set(self.worker_nodes())
        while True:
            nodes = set(self.dev.stats().get("worker_nodes", {}))
            if want <= nodes:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"workers registered from {sorted(nodes)}, want {sorted(want)}")
            time.sleep(0.25)  # ok: polling another process

    def chaos(self, tally: Tally) -> dict[str, Any]:
        args = self.args
        self.cli.start()
        ready_s = self.wait_ready()
        say(f"# CLI serving from every node in {ready_s:.1f} s; seed {args.seed}; "
            f"{args.rate:g} faults/min, weights kill/node/cut {args.weights}")  # fmt: skip
        done = threading.Event()
        limit_s = args.minutes * 60.0

        measured: threading.Thread | None = None

        def more() -> bool:
            if measured is not None:
                return measured.is_alive()
            return args.faults is not None and self.injected() < args.faults

        def client() -> None:
            try:
                asyncio.run(sessions(self.dev, self.api_key, args, tally, more))
            finally:
                done.set()

        threading.Thread(target=client, name="client", daemon=True).start()
        self.start = time.time()
        if args.recovery:
            measured = threading.Thread(target=self.recovery_round, args=(args.recovery, done))
            measured.start()
        gap = 60.0 / args.rate
        next_at = self.start + self.rng.expovariate(1.0 / gap)
        while not done.is_set():
            now = time.time()
            if args.faults is not None and self.injected() >= args.faults:
                break
            if args.faults is None and now - self.start >= limit_s:
                break
            if measured is not None:
                if not measured.is_alive():
                    break
                self.tick()
                done.wait(0.5)
                continue
            if now >= next_at:
                fault = self.inject(self.rng.choices(KINDS, args.weights)[0])
                self.faults.append(fault)
                say(f"{fault.t_s:8.1f}s  {fault.kind:<22} {fault.target}")
                next_at += self.rng.expovariate(1.0 / gap)
            self.tick()
            done.wait(min(0.5, max(0.01, next_at - time.time())))
        if measured is not None:
            measured.join()
        faults_s = time.time() - self.start
        self.heal()
        say(f"# faults stopped after {faults_s:.0f} s; waiting for the last answers")
        settled = done.wait(args.settle_s)
        end_s = time.time() - self.start
        self.tick()
        code = self.cli.stop()
        time.sleep(3)  # ok: Ray ends the actors of an exited driver within a moment
        left = job_actors([self.host.proc.pid])
        self.events.extend(self.dev.ask("events"))
        return {"faults_s": faults_s, "end_s": end_s, "settled": settled, "cli_exit": code,
                "left_behind": [f"{k} pid {p} on {n}" for k, p, n in left]}  # fmt: skip

    def injected(self) -> int:
        return sum(1 for f in self.faults if not f.kind.startswith("skipped"))

    def recovery_round(self, k: int, done: threading.Event) -> None:
        """``--recovery``: kill one node bridge, then the coordinator, then cut the link
        for 3 s, ``k`` times each (the sessions run meanwhile; ``done`` is set when they
        end); each time wait until the nodes it touched answer again."""
        for what in self.args.recovery_of.split(","):
            for _ in range(k):
                if done.wait(8):  # let every node serve steadily first
                    return
                now = time.time()
                if what == "link":
                    self.proxy.down()
                    time.sleep(3.0)  # ok: the cut lasts this long
                    self.link_up()
                    since = self.ups[-1]
                    fault = Fault(now - self.start, now, "link cut", "3.0 s", self.worker_nodes(),
                                  since)  # fmt: skip
                else:
                    actors = [a for a in job_actors([self.host.proc.pid]) if a[0] == what]
                    if not actors:
                        continue
                    _, pid, node = actors[self.rng.randrange(len(actors))]
                    os.kill(pid, signal.SIGKILL)
                    nodes = self.worker_nodes() if what == "coordinator" else [node]
                    fault = Fault(now - self.start, now, f"kill {what}", f"pid {pid} on {node}",
                                  nodes, now)  # fmt: skip
                self.faults.append(fault)
                say(f"{fault.t_s:8.1f}s  {fault.kind:<22} {fault.target}")
                deadline = fault.since + 120
                while time.time() < deadline:
                    answered = self.dev.ask(f"answered_after {fault.since + AFTER_S}")
                    if all(n in answered for n in fault.nodes):
                        break
                    time.sleep(0.25)  # ok: polling another process

    def recovery(self) -> dict[str, list[float]]:
        """Per fault kind, seconds from each fault to each of its nodes' next answer."""
        out: dict[str, list[float]] = {}
        for f in self.faults:
            if not f.nodes:
                continue
            since = f.since
            if f.kind == "link cut":  # a later cut may have kept it down longer
                since = next((t for t in self.ups if t >= f.wall), since)
            answered = self.dev.ask(f"answered_after {since + AFTER_S}")
            for node in f.nodes:
                if node in answered:
                    out.setdefault(f.kind, []).append(answered[node] - since)
        return out


def read_status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1.0) as r:
            status: dict[str, Any] = json.loads(r.read())
            return status
    except (OSError, ValueError):
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(text, flush=True)


def requeues_by_cause(
    faults: list[Fault], events: list[list[Any]], window_s: float
) -> Counter[str]:
    """Batches re-queued (a stream ended holding them), by the fault that came
    within ``window_s`` before (the latest), else ``no fault``."""
    out: Counter[str] = Counter()
    walls = [f for f in faults if not f.kind.startswith("skipped")]
    for t, kind, _node, n, *_ in events:
        if kind != "requeued":
            continue
        cause = "no fault"
        for f in reversed(walls):
            end = max(f.wall, f.since)
            if f.wall <= t <= end + window_s:
                cause = f.kind
                break
        out[cause] += int(n)
    return out


def held_when_requeued(events: list[list[Any]]) -> dict[int, list[float]]:
    """Per delivery number, how long each re-queued batch had been in flight on the
    stream that ended holding it (a long one is a delivery the next fault can cost)."""
    out: dict[int, list[float]] = {}
    for event in events:
        if event[1] == "requeued" and len(event) > 4:
            for age_s, number in event[4]:
                out.setdefault(int(number), []).append(float(age_s))
    return out


def table(run: Run, tally: Tally, outcome: dict[str, Any]) -> dict[str, Any]:
    stats = run.dev.stats()
    kinds = Counter(f.kind for f in run.faults)
    dead = sum(tally.dead.values())
    failed = sum(tally.failed.values())
    lost = tally.tasks - tally.answered
    tasks = max(1, tally.tasks)
    recovery = run.recovery()
    restarts = len(run.cli.starts) - 1
    say("")
    say(f"seed {run.args.seed}: {run.injected()} faults in {outcome['faults_s']:.0f} s "
        f"({run.injected() / max(1e-9, outcome['faults_s']) * 60:.1f}/min), run ended at "
        f"{outcome['end_s']:.0f} s, {tally.rounds} round(s) of {run.args.sessions} x "
        f"{run.args.tasks} tasks")  # fmt: skip
    say("")
    say("| faults by kind | count |\n|---|---:|")
    for kind, n in sorted(kinds.items()):
        say(f"| {kind} | {n} |")
    say("")
    rows = [
        ("tasks", tally.tasks, ""),
        ("answered ok", tally.ok, pct(tally.ok, tasks)),
        ("failed", failed, pct(failed, tasks)),
        ("lost (never answered)", lost, pct(lost, tasks)),
        ("doubled (a task answered twice)", tally.doubled, ""),
        ("answers the client dropped (repeats, unknown tasks)", tally.ignored, ""),
        ("answered with another task's payload", tally.wrong_payload, ""),
        ("dead-lettered", dead, pct(dead, tasks)),
        ("CLI restarts", restarts, ""),
        ("node-bridge replacements", sum(run.replaced.values()), ""),
        ("pool actors replaced (coordinators' counts)", sum(run.restarts_seen.values()), ""),
        ("deliveries / redeliveries (queue manager)",
         f"{stats['deliveries']} / {stats['redeliveries']}", ""),
        ("results dropped (queue manager)", stats["dropped_results"], ""),
        ("processes of the job left at the end", len(outcome["left_behind"]), ""),
    ]  # fmt: skip
    say("| outcome | count | % of tasks |\n|---|---:|---:|")
    for name, n, p in rows:
        say(f"| {name} | {n} | {p} |")
    for title, counts in (("dead-lettered", tally.dead), ("failed", tally.failed)):
        for why, n in counts.most_common():
            say(f"| {title}: {why} | {n} | {pct(n, tasks)} |")
    say("")
    causes = requeues_by_cause(run.faults, run.events, window_s=3.0)
    say("| batches re-queued (stream ended holding them), by the fault just before | batches |")
    say("|---|---:|")
    for cause, n in causes.most_common():
        say(f"| {cause} | {n} |")
    say("")
    held = held_when_requeued(run.events)
    say("| re-queued at delivery | batches | in flight then: median s | p90 s | over 1 s |")
    say("|---|---:|---:|---:|---:|")
    for number, ages in sorted(held.items()):
        ages.sort()
        p90 = ages[min(len(ages) - 1, int(0.9 * len(ages)))]
        over = sum(1 for a in ages if a > 1.0)
        say(f"| {number} | {len(ages)} | {statistics.median(ages):.2f} | {p90:.2f} | {over} |")
    say("")
    say(
        "| until the node answers again | n | median s | p90 s | max s |\n|---|---:|---:|---:|---:|"
    )
    for kind, values in sorted(recovery.items()):
        values.sort()
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        say(f"| {kind} | {len(values)} | {statistics.median(values):.1f} | {p90:.1f} | "
            f"{values[-1]:.1f} |")  # fmt: skip
    exits = Counter(code for _, code in run.cli.exits)
    say(f"\nCLI exit codes: {dict(exits)}; final stop: {outcome['cli_exit']}; "
        f"left behind: {outcome['left_behind'] or 'nothing'}")  # fmt: skip
    return {
        "seed": run.args.seed, "args": vars(run.args), **outcome,
        "faults": [asdict(f) for f in run.faults], "fault_kinds": dict(kinds),
        "tasks": tally.tasks, "ok": tally.ok, "failed": dict(tally.failed), "lost": lost,
        "doubled": tally.doubled, "ignored": tally.ignored, "wrong_payload": tally.wrong_payload,
        "dead": dict(tally.dead), "dead_pct": 100.0 * dead / tasks, "cli_restarts": restarts,
        "node_bridges_replaced": sum(run.replaced.values()), "requeued_by_cause": dict(causes),
        "held_when_requeued": held,
        "recovery_s": recovery, "devserver": stats,
    }  # fmt: skip


def pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.2f} %"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--seed", type=int, default=None, help="fault schedule seed (default: random, printed)")
    a("--rate", type=float, default=40.0, help="faults per minute (default: 40)")
    a("--minutes", type=float, default=5.0, help="stop injecting after this long (default: 5)")
    a(
        "--faults",
        type=int,
        default=None,
        help="long mode: inject this many faults, repeating rounds of sessions (e.g. 20000)",
    )
    a(
        "--weights",
        type=float,
        nargs=3,
        default=[0.55, 0.13, 0.32],
        metavar=("KILL", "NODE", "CUT"),
        help="weights of the kinds: SIGKILL of an actor, node replaced, link cut",
    )
    a(
        "--cut-s",
        type=float,
        nargs=2,
        default=[2.0, 5.0],
        metavar=("MIN", "MAX"),
        help="how long a cut link stays down, drawn uniformly (default: 2 5)",
    )
    a("--sessions", type=int, default=4)
    a("--tasks", type=int, default=6000, help="tasks per session")
    a("--batch-size", type=int, default=10)
    a("--task-ms", type=int, default=15, help="each task sleeps this long")
    a("--nodes", type=int, default=3, help="worker nodes")
    a("--node-cpus", type=float, default=2)
    a("--actors", type=int, default=6)
    a("--settle-s", type=float, default=300.0, help="after the faults, wait this long for answers")
    a(
        "--recovery",
        type=int,
        default=0,
        metavar="K",
        help="no random faults: kill a node bridge, the coordinator, cut the link, K times each",
    )
    a(
        "--recovery-of",
        default="node-bridge,coordinator,link",
        help="with --recovery: which faults, in order (default: node-bridge,coordinator,link)",
    )
    a("--log-level", default="info", help="the CLI's --log-level")
    a("--out", default=str(ROOT / "benchmarks" / "out" / "chaos_cluster.json"))
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    say(f"# seed {args.seed}; system logs: {log_path}")
    tally = Tally()
    with open(log_path, "w") as log, ExitStack() as stack:
        run = Run(args, stack, log)
        if args.recovery:
            args.minutes = 1e9
        outcome = run.chaos(tally)
        result = table(run, tally, outcome)
    out.write_text(json.dumps(result, indent=1, default=str))
    say(f"# written: {out}")
    ok = (
        result["lost"] == 0 and result["doubled"] + result["ignored"] + result["wrong_payload"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
