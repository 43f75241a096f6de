"""Chaos at cluster scale: one seeded run, in a process of its own
(``tests/faults/test_chaos_cluster.py`` runs it; ``CHAOS_SEED`` / ``--seed`` replays one)::

    python -m tests.support.chaos_cluster [--seed N] [--scale X | --faults N]

A Ray cluster of raylets on this machine (``ray.cluster_utils.Cluster``: a 0-CPU
head where the coordinator bridge runs, three worker nodes), the elastic pool
across node bridges (``--bridges per-node``), the local services in a process
of their own (``tests/support/services_process.py``) and a TCP proxy between
every bridge and the queue manager, and one before the node cache. Four lanes
of sessions send tasks of ``tests.support.chaos_handlers:tagged`` in waves, each
wave at a new shared-data level, while the faults of a seeded plan
(``tests/support/chaos_plan.py``) are injected at points of the progress:
pool actors and node bridges SIGKILLed, worker nodes replaced, the link to the
queue manager and the node cache down for seconds, WorkerStreams and
registrations aborted by the queue manager, sessions closed while their batches
run, lulls in which the pool shrinks while batches are in flight, and raising,
garbage, hanging and crashing tasks.

Printed: ``CHAOS SEED``, one ``CHAOS FAULT`` line per fault (seconds since the
start, progress, kind, victim), the outcome table, and ``RESULT {...}`` (JSON)
for the test, which asserts on it. ``--faults 20000`` is the long mode (the run
scaled to about that many faults; ``--scale X`` multiplies tasks and faults).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ray_alpcrun import errors
from ray_alpcrun.bridge.debugging import rss_kb
from ray_alpcrun.client import AsyncClient, AsyncSession
from tests.support.chaos_machine import (
    MARK,
    NODE_CPUS,
    WORKER_NODES,
    MainThread,
    Nodes,
    marked,
    node_of,
)
from tests.support.chaos_plan import (
    MINIMUMS,
    Fault,
    Plan,
    Tally,
    Task,
    make_plan,
    outcome_table,
    payload,
    scale_for_faults,
    task_of,
)
from tests.support.chaos_proxy import TcpProxy
from tests.support.chaos_report import WARM_UP, figures
from tests.support.services_process import ServicesProcess

BATCH, WAVE, NAP_MS = 8, 200, 2
WINDOW = 2  # max_inflight_batches_per_worker of every session
MAX_PENDING = 96  # tasks a wave holds at a time
TASK_TIMEOUT_S = 0.5
DOWNSCALE_DELAY_S = 3.0
LULL_S = DOWNSCALE_DELAY_S + 2.5
# A lull that saw no scale-down under load goes on up to this long while the run
# still lacks its minimum: faults that land in a lull (a link cut leaves the
# bridges no batch to hold) cost CI runs their second one ("1 < 2", twice).
LULL_MAX_S = 3 * LULL_S
LULL_NAP_MS = 120  # each task of the lane that goes on through a lull (under TASK_TIMEOUT_S)
TICK_S = 10.0  # a line of where the run stands
# No answer for this long: the run stops and reports where the tasks are.
STALL_S = float(os.environ.get("CHAOS_STALL_S", "90"))


def log(line: str) -> None:
    print(line, flush=True)


# -- progress, lanes, sessions ----------------------------------------------------


class Progress:
    """Tasks answered so far; ``reach(n)`` waits until ``n`` were."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, n: int) -> None:
        self.done += n
        keep = []
        for target, fut in self._waiters:
            if self.done >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def reach(self, n: int) -> None:
        if self.done >= n:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        await fut

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class Wave:
    level: int
    tasks: list[int] = field(default_factory=list)  # lane index of each task sent
    answered: int = 0
    sent_all: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None


@dataclass
class SessionRun:
    tag: str
    session: AsyncSession
    waves: list[Wave] = field(default_factory=list)
    close: asyncio.Event = field(default_factory=asyncio.Event)  # a fault asks for it
    closed: bool = False
    routed_dead: set[tuple[str, int]] = field(default_factory=set)  # answered by a dead letter

    @property
    def sent(self) -> int:
        return sum(len(w.tasks) for w in self.waves)


class Run:
    """One chaos run (see the module docstring)."""

    def __init__(self, plan: Plan, run_id: str, mark_dir: str) -> None:
        self.plan = plan
        self.run_id = run_id
        self.mark_dir = mark_dir
        self.t0 = time.monotonic()
        self.progress = Progress(plan.tasks)
        self.tally = Tally()
        self.faults: Counter[str] = Counter()
        self.fault_log: list[dict[str, Any]] = []
        self.notes: Counter[str] = Counter()
        self.status: dict[str, Any] = {}
        self.samples: dict[int, list[tuple[float, float, int]]] = {}  # pid -> (t, progress, kb)
        self.roles: dict[int, str] = {}
        self.active: dict[int, SessionRun] = {}  # lane -> its session now
        self.lull_lane: int | None = None
        self.lull_over = asyncio.Event()
        self.lull_over.set()
        self.shrank = asyncio.Event()  # set by each scale-down under load counted
        self.outages: dict[str, int] = Counter()
        self.background: set[asyncio.Task[Any]] = set()
        # (node, why, since, bridges seen then); seconds until a node serves again
        self.recovering: list[tuple[str, str, float, set[Any]]] = []
        self.recoveries: dict[str, list[float]] = {}
        self.handle: Any = None
        self.svc: ServicesProcess
        self.queue_proxy: TcpProxy
        self.cache_proxy: TcpProxy
        self.nodes: Nodes
        self.main = MainThread()
        self.stalled = asyncio.Event()
        self.stall_lines: list[str] = []  # the stall report, for the test's message

    # -- bookkeeping ----------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def fault(self, kind: str, detail: str = "", count: int = 1) -> None:
        self.faults[kind] += count
        if kind == "scale-down under load":
            self.shrank.set()
        entry = {"t": round(self.now(), 2), "p": round(self.progress.fraction, 3), "kind": kind,
                 "detail": detail}  # fmt: skip
        self.fault_log.append(entry)
        log(f"CHAOS FAULT t={entry['t']:.2f}s p={entry['p']:.3f} {kind}"
            + (f" ({detail})" if detail else ""))  # fmt: skip

    def own(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._owned_done)

    def _owned_done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log(f"CHAOS FAULT TASK FAILED: {task.exception()!r}")
            self.notes[f"fault task failed: {type(task.exception()).__name__}"] += 1

    # -- lanes ------------------------------------------------------------------

    async def lane(self, k: int, client: AsyncClient) -> None:
        kinds = self.plan.lanes[k]
        pos, generation = 0, 0
        while pos < len(kinds):
            tag = f"s{k}g{generation}"
            session = await client.create_session(
                app_id=f"chaos-{tag}", max_inflight_batches_per_worker=WINDOW
            )
            s = SessionRun(tag, session)
            self.active[k] = s
            consumers = []
            while pos < len(kinds) and not s.close.is_set():
                wave = Wave(level=len(s.waves) + 1)
                s.waves.append(wave)
                await session.set_shared_data(f"{tag}:L{wave.level}".encode(), level=wave.level)
                todo = kinds[pos : pos + WAVE]
                consumers.append(asyncio.ensure_future(self._consume(k, s, wave, todo, pos)))
                await wave.sent_all.wait()
                pos += len(wave.tasks)
            if s.close.is_set():
                await self._close_mid_run(s)
            await asyncio.gather(*consumers)
            if s.closed:
                await self._read_dead_letters(s)
            stream = getattr(session, "_stream", None)  # answers the client saw twice
            self.tally.ignored += int(getattr(stream, "ignored", 0))
            del self.active[k]
            with contextlib.suppress(errors.AlpcrunError):
                await session.close()
            generation += 1

    async def _feed(self, k: int, s: SessionRun, wave: Wave, kinds: list[str], first: int) -> Any:
        try:
            for j, kind in enumerate(kinds):
                while not s.close.is_set() and self.lull_lane is not None:
                    if self.lull_lane == k and len(wave.tasks) - wave.answered < 2 * BATCH:
                        break  # the lane that goes on, at a trickle
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._moved_or_lull_over(), 0.5)
                if s.close.is_set():
                    return
                index = first + j
                self.tally.send(s.tag, Task(kind, index, wave.level))
                wave.tasks.append(index)
                # The lane that goes on through a lull sends slower tasks, so that
                # batches are in flight while the pool shrinks on any machine (on a
                # fast one, 2 ms tasks left the pool idle at most releases: a run
                # counted one scale-down under load, of the two required).
                nap_ms = LULL_NAP_MS if self.lull_lane == k else NAP_MS
                yield payload(kind, s.tag, index, self.mark_dir, nap_ms)
        finally:
            wave.sent_all.set()

    async def _moved_or_lull_over(self) -> None:
        moved = asyncio.ensure_future(self.progress.reach(self.progress.done + 1))
        over = asyncio.ensure_future(self.lull_over.wait())
        try:
            await asyncio.wait({moved, over}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            over.cancel()

    async def _consume(
        self, k: int, s: SessionRun, wave: Wave, kinds: list[str], first: int
    ) -> None:
        results = s.session.submit(
            self._feed(k, s, wave, kinds, first),
            batch_size=BATCH,
            shared_level=wave.level,
            timeout_s=600,
            max_pending_tasks=MAX_PENDING,
        )
        try:
            async for r in results:
                index = wave.tasks[r.index]
                if r.dead:
                    s.routed_dead.add((r.batch_id, index))
                self.tally.answer(s.tag, index, r.payload, r.error, r.dead)
                wave.answered += 1
                self.progress.add(1)
        except errors.AlpcrunError as exc:
            wave.failure = str(exc)
            if not s.closed:
                log(f"CHAOS WAVE FAILED {s.tag} level {wave.level}: {exc}")
        finally:
            wave.sent_all.set()

    async def _close_mid_run(self, s: SessionRun) -> None:
        """CloseSession once every task sent has reached the queue manager (a batch
        on its way would be refused by a closed session), from another client."""
        for w in s.waves:
            await w.sent_all.wait()
        sent = s.sent
        deadline = time.monotonic() + 30
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = await asyncio.to_thread(self.svc.call, "session", id=s.session.id)
            if info.get("submitted", 0) >= sent:
                break
            await asyncio.sleep(0.02)  # ok: polls the queue manager's count (bounded)
        async with self.client() as operator:
            await operator.session(s.session.id).close()
        s.closed = True
        self.tally.closed_sessions.add(s.tag)
        unanswered = int(info.get("unanswered", 0))
        if unanswered > 0:
            self.fault("session closed", f"{s.tag}, {unanswered} of {sent} tasks unanswered")
        else:
            self.notes["session closed with nothing running"] += 1

    async def _read_dead_letters(self, s: SessionRun) -> None:
        """A closed session's dead letters that reached no submission (its result
        stream ended with the session)."""
        batches = []
        for _ in range(3):
            try:
                batches = await s.session.dead_letters()
                break
            except errors.AlpcrunError as exc:
                log(f"CHAOS DEAD LETTERS of {s.tag} not read: {exc}")
                await asyncio.sleep(0.5)  # ok: a retry of a failed read
        for batch in batches:
            for m in batch.messages:
                named = task_of(bytes(m.payload))
                if named is None or named[0] != s.tag:
                    self.tally.wrong.append(f"dead letter of {s.tag} carries {m.payload!r}")
                    continue
                if (batch.id, named[1]) in s.routed_dead:
                    continue  # the same dead letter, already seen by its submission
                self.tally.answer(s.tag, named[1], None, m.error or "dead letter", True)
                self.progress.add(1)

    def client(self) -> AsyncClient:
        svc = self.svc
        return AsyncClient(
            svc.queue_address, svc.central_cache_address, api_key=svc.api_key,
            proto_package=svc.proto_package,
        )  # fmt: skip

    # -- faults -----------------------------------------------------------------

    async def memory_baseline(self) -> None:
        """The coordinator's C heap at warm-up (and under ``CHAOS_TRACEMALLOC``
        its Python memory: ``memory_report`` prints where it grew since)."""
        await self.progress.reach(int(WARM_UP * self.progress.total))
        for line in await self.handle.actor.debug_memory.remote(0):
            log(f"CHAOS MEMORY coordinator at warm-up: {line}")

    async def memory_report(self) -> None:
        """The C heap once drained, before and after ``malloc_trim`` (what grew
        and is in use, against what was freed and not given back)."""
        for line in await self.handle.actor.debug_memory.remote(25, True):
            log(f"CHAOS MEMORY coordinator {line}")

    async def inject(self) -> None:
        for f in self.plan.faults:
            await self.progress.reach(int(f.at * self.progress.total))
            await self.one(f)

    async def one(self, f: Fault) -> None:
        rng = random.Random(f.pick)
        kind = f.kind
        if kind == "actor killed":
            await self._kill(rng, "ray::PoolActor", kind)
        elif kind == "node bridge killed":
            await self._kill(rng, "ray::NodeBridge", kind)
        elif kind == "node replaced":
            self.own(self._replace_node(rng))
        elif kind == "link cut":
            self.own(self._outage(self.queue_proxy, kind, f.seconds))
        elif kind == "node cache outage":
            self.own(self._outage(self.cache_proxy, kind, f.seconds))
        elif kind in ("stream aborted", "registration aborted"):
            self.own(self._abort(kind, f.pick))
        elif kind == "session closed":
            lanes = sorted(k for k, s in self.active.items() if not s.close.is_set())
            if lanes:
                self.active[rng.choice(lanes)].close.set()
        elif kind == "lull" and self.lull_lane is None:
            self.own(self._lull(rng))

    async def _kill(self, rng: random.Random, title: str, kind: str) -> None:
        for _ in range(20):
            pids = sorted(p for p, cmd in marked(self.run_id).items() if cmd.startswith(title))
            if pids:
                pid = rng.choice(pids)
                node = node_of(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.fault(kind, f"pid {pid} on {node}")
                    if kind == "node bridge killed":
                        self._await_recovery(node, "node bridge killed")
                    return
            await asyncio.sleep(0.25)  # ok: none up right now (all restarting)
        self.notes[f"{kind}: none found"] += 1

    async def _replace_node(self, rng: random.Random) -> None:
        async with self.nodes.lock:
            index = rng.randrange(len(self.nodes.workers))
            gone = await self.main.call(self.nodes.remove, index)
            new = await self.main.call(self.nodes.add)
            self.fault("node replaced", f"{gone} removed, {new} added")
            self._await_recovery(new, "node added")

    async def _outage(self, proxy: TcpProxy, kind: str, seconds: float) -> None:
        self.fault(kind, f"{seconds:.1f} s")
        before = 0
        if kind == "link cut":
            before = int((await asyncio.to_thread(self.svc.call, "stats"))["workers"])
        self.outages[kind] += 1
        proxy.down()
        try:
            await asyncio.sleep(seconds)  # ok: the outage lasts this long
        finally:
            self.outages[kind] -= 1
            if self.outages[kind] == 0:
                proxy.up()
        if before and self.outages[kind] == 0:
            await self._link_back(before)

    async def _link_back(self, before: int) -> None:
        """Seconds from the link's return until the queue manager has as many
        workers registered as before the cut (a measurement; 20 s at most)."""
        back = self.now()
        while self.now() - back < 20:
            if int((await asyncio.to_thread(self.svc.call, "stats"))["workers"]) >= before:
                self.recoveries.setdefault("link cut", []).append(round(self.now() - back, 2))
                return
            await asyncio.sleep(0.1)  # ok: polls the queue manager's count (bounded)
        self.notes["link cut: workers not all back within 20 s"] += 1

    async def _abort(self, kind: str, seed: int) -> None:
        what = "stream" if kind == "stream aborted" else "registration"
        for attempt in range(20):
            reply = await asyncio.to_thread(self.svc.call, "abort", kind=what, seed=seed + attempt)
            if reply["aborted"]:
                self.fault(kind)
                return
            await asyncio.sleep(0.25)  # ok: none open right now (a link cut)
        self.notes[f"{kind}: none open"] += 1

    async def _lull(self, rng: random.Random) -> None:
        lanes = sorted(self.active)
        if not lanes:
            return
        self.lull_lane = rng.choice(lanes)
        self.lull_over.clear()
        self.notes["lulls"] += 1
        log(f"CHAOS LULL t={self.now():.2f}s lanes pause but s{self.lull_lane} ({LULL_S:g} s)")
        kind, start = "scale-down under load", self.now()
        self.shrank.clear()
        try:
            await asyncio.sleep(LULL_S)  # ok: the lull lasts this long
            if not self.shrank.is_set() and self.faults[kind] < MINIMUMS[kind]:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.shrank.wait(), LULL_MAX_S - LULL_S)
            if self.now() - start > LULL_S + 0.25:
                log(f"CHAOS LULL over t={self.now():.2f}s (held {self.now() - start:.1f} s)")
        finally:
            self.lull_lane = None
            self.lull_over.set()

    # -- watching ---------------------------------------------------------------

    def _await_recovery(self, node: str, why: str) -> None:
        """Time from now until a node bridge on ``node`` that is not one seen now
        has a logical worker registered (read from the coordinator's status)."""
        seen = {b.get("name") for b in self.status.get("bridges", []) if b.get("node") == node}
        self.recovering.append((node, why, self.now(), seen))

    def _recovered(self, status: dict[str, Any]) -> None:
        waiting = []
        for node, why, since, seen in self.recovering:
            serving = [
                b for b in status.get("bridges", [])
                if b.get("node") == node and b.get("name") not in seen and b.get("registered")
                and not b.get("dead")
            ]  # fmt: skip
            if serving:
                self.recoveries.setdefault(why, []).append(round(self.now() - since, 2))
            else:
                waiting.append((node, why, since, seen))
        self.recovering = waiting

    async def watch(self, stop: asyncio.Event) -> None:
        """The coordinator's status (scale-downs under load) and every long-lived
        process's memory, every half second."""
        released: tuple[int, int] | None = None
        coordinator = 0
        last_tick = last_done = 0.0
        moved_at = self.now()
        while not stop.is_set():
            if self.progress.done != last_done:
                last_done, moved_at = self.progress.done, self.now()
            if self.now() - last_tick >= TICK_S:
                last_tick = self.now()
                await self._tick()
            if self.now() - moved_at >= STALL_S and not self.stalled.is_set():
                log(f"CHAOS STALLED: no answer for {STALL_S:g} s")
                await self._tick()
                await self._stall_report()
                self.stalled.set()
            try:
                status = await asyncio.wait_for(self.handle.status(), 10)
            except Exception as exc:  # a slow moment; the next round tries again
                self.notes[f"status failed: {type(exc).__name__}"] += 1
                status = None
            if status is not None:
                self.status = status
                self._recovered(status)
                coordinator = int(status.get("pid", 0))
                # The pool counts the releases made while it held batches itself:
                # a status read half a second later may find the lull lane between
                # batches (a run on CI counted none of its four lulls so).
                scaling = status.get("scaling", {})
                now_released = (
                    int(scaling.get("released", 0)), int(scaling.get("released_under_load", 0))
                )  # fmt: skip
                if released is not None and now_released[0] > released[0]:
                    busy = now_released[1] - released[1]
                    if busy > 0:
                        detail = f"{busy} actor(s) released while batches were held"
                        self.fault("scale-down under load", detail)
                    if now_released[0] - released[0] > busy:
                        self.notes["scale-down while idle"] += 1
                released = now_released
            roles = {self.svc.pid: "devserver"}
            if coordinator:
                roles[coordinator] = "coordinator"
            for pid, cmd in marked(self.run_id).items():
                if cmd.startswith("ray::NodeBridge"):
                    roles[pid] = "node bridge"
            for pid, role in roles.items():
                kb = rss_kb(pid)
                if kb is not None:
                    self.roles[pid] = role
                    self.samples.setdefault(pid, []).append(
                        (self.now(), self.progress.fraction, kb)
                    )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _tick(self) -> None:
        """One line of where the run stands (and, when stalled, why)."""
        st = self.status
        bridges = " ".join(
            f"{b.get('node')}:{b.get('registered')}{'(dead)' if b.get('dead') else ''}"
            for b in st.get("bridges", [])
        )
        sessions = []
        for k, sr in sorted(self.active.items()):
            info = await asyncio.to_thread(self.svc.call, "session", id=sr.session.id)
            sessions.append(f"s{k}:{sr.sent}/{info.get('unanswered', '?')}")
        qm = await asyncio.to_thread(self.svc.call, "stats")
        scaling = st.get("scaling", {})
        log(f"CHAOS TICK t={self.now():.0f}s p={self.progress.fraction:.3f} "
            f"actors {scaling.get('live')}+{scaling.get('pending')} target {scaling.get('target')} "
            f"nodes {[n for n, _ in self.nodes.workers]} bridges [{bridges}] "
            f"coordinator slots {sum(1 for x in st.get('slots', []) if x.get('registered'))} "
            f"qm workers {qm.get('workers')} sessions(sent/unanswered) {' '.join(sessions)} "
            f"outages {dict(self.outages)}")  # fmt: skip

    async def _stall_report(self) -> None:
        """Where the unanswered tasks are: the queue manager's view, and what every
        bridge's asyncio tasks wait on (and its threads, where py-spy is installed)."""
        import ray

        def report(line: str) -> None:
            self.stall_lines.append(line)
            log(line)

        where = await asyncio.to_thread(self.svc.call, "where")
        report("CHAOS STALL queue manager: " + json.dumps(where))
        bridges = [("coordinator", self.handle.actor)]
        for b in self.status.get("bridges", []):
            with contextlib.suppress(Exception):
                bridges.append((str(b.get("name")), ray.get_actor(str(b.get("name")))))
        for name, actor in bridges:
            try:
                lines = await asyncio.wait_for(actor.debug_tasks.remote(12), 10)
            except Exception as exc:  # a dead or hung bridge says so
                lines = [f"no answer: {exc!r}"]
            for line in lines:
                report(f"CHAOS STALL {name} task {line}")
        bin_dirs = os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", "")))
        spy = shutil.which("py-spy", path=bin_dirs)
        if spy:
            for pid, cmd in marked(self.run_id).items():
                if cmd.startswith(("ray::NodeBridge", "ray::Bridge")):
                    dump = await asyncio.to_thread(
                        subprocess.run, [spy, "dump", "--pid", str(pid)],
                        capture_output=True, text=True, timeout=30,
                    )  # fmt: skip
                    log(f"CHAOS STALL py-spy {pid} {cmd[:40]}:\n{dump.stdout}{dump.stderr}")


# -- the run ------------------------------------------------------------------------


def bridge_config(svc: ServicesProcess, queue: str, cache: str) -> Any:
    from ray_alpcrun.config import BridgeConfig, PoolConfig, ServiceConfig

    services = ServiceConfig(
        queue_address=queue, cache_address=cache,
        central_cache_address=svc.central_cache_address, api_key=svc.api_key,
        proto_package=svc.proto_package,
    )  # fmt: skip
    pool = PoolConfig(
        num_actors=WORKER_NODES * NODE_CPUS,
        min_actors=2,
        max_actors=WORKER_NODES * NODE_CPUS,
        downscale_delay_s=DOWNSCALE_DELAY_S,
        cpus_per_actor=1,
        min_chunk=4,
        task_timeout_s=TASK_TIMEOUT_S,
        restart_backoff_max_s=2.0,
        data_path=os.environ.get("CHAOS_DATA_PATH", "direct"),
    )
    return BridgeConfig(
        services=services, handler="tests.support.chaos_handlers:tagged", pool=pool,
        backoff_max_s=1.0, session_linger_s=5.0,
    )  # fmt: skip


async def chaos(run: Run) -> None:
    from ray_alpcrun.bridge.launch import start_bridge

    config = bridge_config(run.svc, run.queue_proxy.address, run.cache_proxy.address)
    run.handle = start_bridge(config)
    await run.handle.wait_ready_async(180)
    log(f"CHAOS READY t={run.now():.1f}s")
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(run.watch(stop))
    injector = asyncio.ensure_future(run.inject())
    baseline = asyncio.ensure_future(run.memory_baseline())
    clients = [run.client() for _ in run.plan.lanes]
    try:
        for c in clients:
            await c.connect()
        lanes = asyncio.ensure_future(
            asyncio.gather(*(run.lane(k, c) for k, c in enumerate(clients)))
        )
        stalled = asyncio.ensure_future(run.stalled.wait())
        await asyncio.wait({lanes, stalled}, return_when=asyncio.FIRST_COMPLETED)
        stalled.cancel()
        if not lanes.done():
            run.notes["stalled"] += 1
            lanes.cancel()
            await asyncio.gather(lanes, return_exceptions=True)
            return
        lanes.result()
        log(f"CHAOS DRAINED t={run.now():.1f}s")
        if baseline.done():
            await run.memory_report()
        await asyncio.wait_for(injector, 60)
        while run.background:
            await asyncio.gather(*list(run.background))
    finally:
        for c in clients:
            await c.close()
        stop.set()
        await watcher
        injector.cancel()
        baseline.cancel()
        for task in list(run.background):
            task.cancel()
        await asyncio.gather(injector, baseline, *run.background, return_exceptions=True)


def end_of_run(run: Run) -> dict[str, Any]:
    """Stop the bridge; no actor of the job and no bridge or pool process may be left."""
    import ray
    from ray.util.state import list_actors

    status = run.status
    handle = run.handle
    ray.get(handle.stop(drain=False), timeout=120)
    code, reason = ray.get(handle.run_ref, timeout=120)
    ray.kill(handle.actor)
    job = ray.get_runtime_context().get_job_id()
    alive: list[Any] = []
    ours = ("ray::PoolActor", "ray::NodeBridge", "ray::Bridge")
    procs: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            alive = list_actors(
                address=f"http://127.0.0.1:{run.nodes.dashboard_port}",
                filters=[("state", "=", "ALIVE"), ("job_id", "=", job)],
            )
        except Exception as exc:  # the state API answers through the dashboard
            run.notes[f"list_actors failed: {type(exc).__name__}"] += 1
            alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
        procs = {p: c for p, c in marked(run.run_id).items() if c.startswith(ours)}
        if not alive and not procs:
            break
        time.sleep(0.5)  # ok: bounded wait for the killed actors to be gone
    return {
        "bridge_exit": [code, reason],
        "actors_alive": [str(getattr(a, "class_name", a)) for a in alive],
        "processes_left": sorted(procs.values()),
        "status": status,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", "20240611")))
    parser.add_argument("--scale", type=float, default=float(os.environ.get("CHAOS_SCALE", "1")))
    parser.add_argument(
        "--faults", type=int, default=0,
        help="the long mode: scale the run to about this many faults (e.g. 20000)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.faults:
        args.scale = scale_for_faults(args.seed, args.faults)
    plan = make_plan(args.seed, args.scale)
    log(f"CHAOS SEED {args.seed} (replay: CHAOS_SEED={args.seed}); scale {args.scale:g}; "
        f"{plan.tasks} tasks, {len(plan.faults)} planned faults besides the tasks'")  # fmt: skip
    run_id = uuid.uuid4().hex
    os.environ[MARK] = run_id
    mark_dir = tempfile.mkdtemp(prefix="alpcrun-chaos-")
    run = Run(plan, run_id, mark_dir)
    import ray

    with (
        ServicesProcess(os.path.join(mark_dir, "services.log")) as svc,
        TcpProxy(svc.queue_address) as queue_proxy,
        TcpProxy(svc.node_cache_address) as cache_proxy,
    ):
        run.svc, run.queue_proxy, run.cache_proxy = svc, queue_proxy, cache_proxy
        run.nodes = Nodes()
        try:
            for _ in range(WORKER_NODES):
                run.nodes.add()
            run.nodes.cluster.wait_for_nodes()
            ray.init(address=run.nodes.cluster.address, log_to_driver=False)
            session_dir = run.nodes.cluster.head_node.get_session_dir_path()
            log(f"CHAOS CLUSTER t={run.now():.1f}s: head + {WORKER_NODES} worker nodes; "
                f"logs in {session_dir}/logs and {mark_dir}")  # fmt: skip
            done = threading.Event()
            failure: list[BaseException] = []

            def in_loop() -> None:
                try:
                    asyncio.run(chaos(run))
                except BaseException as exc:
                    failure.append(exc)
                finally:
                    done.set()

            loop_thread = threading.Thread(target=in_loop, name="chaos-loop")
            loop_thread.start()
            run.main.serve_until(done)
            loop_thread.join()
            if failure:
                raise failure[0]
            end = end_of_run(run)
            stats = svc.call("stats")
        finally:
            ray.shutdown()
            run.nodes.shutdown()
    deadline = time.monotonic() + 30
    while (left := marked(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)  # ok: bounded wait for the cluster's processes to exit
    result = figures(run, end, stats, left)
    faults = run.faults + run.tally.faults
    log(outcome_table(plan.seed, faults, run.tally, result["restarts"], result["memory"],
                      result["wall_s"]))  # fmt: skip
    for why, seconds in run.recoveries.items():
        log(f"  serving again after {why}: {sorted(seconds)} s")
    lost = result.get("lost_deliveries")
    if lost:
        log(f"  deliveries without an answer, by cause: {lost['all']}")
        log(f"    of the {lost['batches']['dead']} batches dead-lettered for them: "
            f"{lost['of_dead_lettered']}")  # fmt: skip
    if result["failed_checks"]:
        log(f"CHAOS CHECKS FAILED: {result['failed_checks']}")
    log("RESULT " + json.dumps(result))
    if not result["failed_checks"] and not os.environ.get("CHAOS_KEEP_LOGS"):
        shutil.rmtree(mark_dir, ignore_errors=True)
    return 0 if not result["failed_checks"] else 1


if __name__ == "__main__":
    sys.exit(main())
