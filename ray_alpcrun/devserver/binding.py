"""Workers and their sessions: registrations (``WorkerUpdate``), BIND/UNBIND,
session streams (``WorkerStream``), the scheduler's trigger and the worker
timers. No gRPC: ``queue`` calls in, ``core`` owns it.

Decisions (the docs are silent):

* A worker may be sent BIND once it has reported IDLE on ``WorkerUpdate``
  (after registering, and again after every UNBIND). A worker that half-closed
  its ``WorkerUpdate`` (can no longer report) counts as idle as soon as it is
  unbound and its session streams have ended. IDLE/BUSY reports while bound
  are recorded only.
* UNBIND takes effect on the server at once: the worker no longer counts for
  the session and gets no new batches; its ``WorkerStream`` stays open until
  the batches in flight on it are answered, then the server ends it (OK).
  CloseSession with ``cleanup_on_client_exit`` ends the streams at once and
  discards what is in flight (without, in-flight batches are answered).
  When a bound worker's stream ends from its side (broken, half-closed), the
  worker is unbound as well (its batches in flight are re-queued).
* UNBIND is sent on: CloseSession, idle reaping, ``max_workers`` lowered,
  preemption (``scheduler``), a bound worker with nothing queued and nothing
  in flight for ``unbind_idle_after_s``, no ``WorkerStream`` opened within
  ``stream_open_timeout_s`` of BIND, and ``batch_timeout_s`` (below).
* With ``batch_timeout_s`` set, a worker stream whose oldest batch in flight
  is older than that is failed like a broken one (batches re-queued, worker
  unbound, the server ends the stream); a late answer is then dropped.
* ``WorkerStream`` is matched by ``workerid`` when sent, else by node + pod
  (among several registrations from one place, one without an open stream).
* Fault injection (``abort_stream``, ``abort_registration``; chaos tests): the
  server ends a stream with UNAVAILABLE, and treats it as one broken by the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ulid import ULID

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.devserver.flow import QueueStats, TaskFlow
from ray_alpcrun.devserver.model import (
    SessionState,
    SessionTable,
    StreamConn,
    Worker,
    WorkerRegistry,
)
from ray_alpcrun.devserver.scheduler import (
    best_session,
    demand,
    preemption_victims,
    rebalance_donor,
)
from ray_alpcrun.types import Instruction, InstructionType, WorkerState, WorkerStatus

log = logging.getLogger("ray_alpcrun.devserver")


class WorkerBinding:
    """Registered workers, which session each serves, and their streams."""

    def __init__(
        self,
        config: DevServerConfig,
        clock: Callable[[], float],
        stats: QueueStats,
        table: SessionTable,
    ) -> None:
        self.config = config
        self.clock = clock
        self.stats = stats
        self.table = table
        # The flow asks for scheduling when work is queued; it is the binding's to own.
        self.flow = TaskFlow(
            stats, clock, config.max_deliveries, self.work_queued, config.max_message_bytes
        )
        self.workers = WorkerRegistry()
        self._schedule_pending = False
        self._preempting = 0  # workers unbound by preemption, not yet idle again

    def register_worker(self, node: str, pod: str) -> Worker:
        w = Worker(str(ULID()), node, pod, last_activity_s=self.clock())
        self.workers.add(w)
        self.stats.workers_registered += 1
        log.info("worker %s registered from node=%s pod=%s", w.id, node, pod)
        return w

    def worker_state(self, w: Worker, state: WorkerState) -> None:
        w.status = state.status
        if w.bound is not None:
            return
        if state.status == WorkerStatus.IDLE:
            self._make_eligible(w)
        else:
            self.workers.set_eligible(w, False)

    def worker_reports_closed(self, w: Worker) -> None:
        w.reports_closed = True
        self._maybe_idle_without_report(w)

    def unregister_worker(self, w: Worker) -> None:
        if w.id not in self.workers.by_id:
            return
        self.workers.remove(w)
        if w.preempted:
            w.preempted = False
            self._preempting -= 1
        s = w.bound
        if s is not None:
            s.bound.pop(w.id, None)
            w.bound = None
        for conn in list(w.streams.values()):
            self._give_back(conn, aborted=isinstance(w.failure, Rejected))
        w.outbox.put_nowait(None)
        log.info("worker %s unregistered", w.id)
        self.request_schedule()

    def _make_eligible(self, w: Worker) -> None:
        if w.id not in self.workers.by_id or w.bound is not None:
            return
        if w.preempted:
            w.preempted = False
            self._preempting -= 1
        if not w.eligible:
            self.workers.set_eligible(w, True)
            self.request_schedule()

    def _maybe_idle_without_report(self, w: Worker) -> None:
        if w.reports_closed and w.bound is None and not w.streams:
            self._make_eligible(w)

    def bind(self, w: Worker, s: SessionState) -> None:
        self.workers.set_eligible(w, False)
        now = self.clock()
        w.bound = s
        w.bound_at_s = now
        w.last_activity_s = now
        s.bound[w.id] = w
        w.outbox.put_nowait(Instruction(InstructionType.BIND, s.id))
        self.stats.binds += 1
        log.info("BIND worker %s -> session %s (priority %d)", w.id, s.id, s.priority)

    def unbind(self, w: Worker, reason: str) -> None:
        s = w.bound
        if s is None:
            return
        s.bound.pop(w.id, None)
        w.bound = None
        w.outbox.put_nowait(Instruction(InstructionType.UNBIND, s.id))
        self.stats.unbinds += 1
        conn = w.streams.get(s.id)
        if conn is not None:
            conn.draining = True
            s.hungry.pop(conn, None)
            conn.wake.set()
        log.info("UNBIND worker %s from session %s: %s", w.id, s.id, reason)
        self._maybe_idle_without_report(w)

    # --- worker streams ----------------------------------------------------

    def open_stream(self, session_id: str, node: str, pod: str, worker_id: str) -> StreamConn:
        s = self.table.get(session_id)
        if worker_id:
            w = self.workers.by_id.get(worker_id)
            if w is None:
                raise Rejected(
                    "FAILED_PRECONDITION",
                    f"worker {worker_id} is not registered (open WorkerUpdate first)",
                )
            if w.bound is not s:
                raise Rejected(
                    "FAILED_PRECONDITION", f"worker {worker_id} is not bound to session {s.id}"
                )
        else:
            found = [w for w in self.workers.at_place(node, pod) if w.bound is s]
            if not found:
                raise Rejected(
                    "FAILED_PRECONDITION",
                    f"worker at node={node} pod={pod} is not bound to session {s.id} "
                    "(open WorkerStream after BIND)",
                )
            # Several registrations from one place (a restarted worker whose old
            # registration lingers): prefer one that has no stream open yet.
            w = next((x for x in found if s.id not in x.streams), found[0])
        old = w.streams.get(s.id)
        if old is not None:  # the worker reconnected its stream
            self.flow.release_stream(old, requeue=True)
        conn = StreamConn(w, s)
        w.streams[s.id] = conn
        s.streams.add(conn)
        w.last_activity_s = self.clock()
        log.info("worker %s opened its stream for session %s", w.id, s.id)
        return conn

    def close_stream(self, conn: StreamConn) -> None:
        """The ``WorkerStream`` call ended (answered, broken or ended by the server)."""
        ended_by_worker = not conn.closed
        if ended_by_worker:
            self._give_back(conn, aborted=isinstance(conn.failure, Rejected))
        w = conn.worker
        if ended_by_worker and w.bound is conn.session and conn.session.id not in w.streams:
            # A worker that lost its stream would otherwise hold a place in the session
            # without doing anything; the seed's worker only opens a stream after BIND.
            self.unbind(w, "its WorkerStream ended")
        self._maybe_idle_without_report(w)
        self.request_schedule()

    def _give_back(self, conn: StreamConn, aborted: bool) -> None:
        """Re-queue what a stream held that did not end by the server's doing. A
        stream that broke, or ended with batches unanswered (a worker's connection
        that dies may end its calls as if half-closed), marks its connection lost
        first: its batches do not go to the streams that die with it
        (flow.LOST_PEER_S). A call the server ``aborted`` (a fault injected) does not."""
        if not aborted and (conn.lost or conn.inflight):
            self.flow.connection_lost(conn.peer)
        self.flow.release_stream(conn, requeue=True)

    # --- fault injection ---------------------------------------------------

    def abort_stream(self, conn: StreamConn, details: str) -> None:
        """End a ``WorkerStream`` with UNAVAILABLE now, as a queue manager that
        drops it: its batches in flight are re-queued and its worker unbound
        (a late answer is dropped), like a stream broken from the worker's side."""
        if not conn.closed:
            log.info("worker %s: stream of session %s aborted: %s", conn.worker.id,
                     conn.session.id, details)  # fmt: skip
            conn.failure = Rejected("UNAVAILABLE", details)
            conn.wake.set()

    def abort_registration(self, w: Worker, details: str) -> None:
        """End a worker's ``WorkerUpdate`` with UNAVAILABLE now: it is unregistered
        (its session streams end, their batches in flight re-queued)."""
        if w.id in self.workers.by_id and w.failure is None:
            log.info("worker %s: registration aborted: %s", w.id, details)
            w.failure = Rejected("UNAVAILABLE", details)
            w.outbox.put_nowait(None)

    # --- scheduling and timers ---------------------------------------------

    def request_schedule(self) -> None:
        """Run ``schedule`` soon, once, however many events asked for it."""
        if self._schedule_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.schedule()
            return
        self._schedule_pending = True
        loop.call_soon(self.schedule)

    def work_queued(self, s: SessionState) -> None:
        # Per batch, scheduling matters only when a worker is free or the session just
        # got work; everything else (e.g. more preemption for a growing queue) is
        # picked up by the next tick.
        if self.workers.eligible or s.tasks.batches == 1:
            self.request_schedule()

    def schedule(self) -> None:
        """Bind eligible workers to the sessions that want them; preempt if needed."""
        self._schedule_pending = False
        wanting = [s for s in self.table.open.values() if s.wants_worker()]
        eligible = self.workers.eligible
        while wanting and eligible:
            s = best_session(wanting)
            assert s is not None
            self.bind(next(iter(eligible.values())), s)
            if not s.wants_worker():
                wanting.remove(s)
        if not wanting:
            return
        if not self._preempting:
            self._rebalance(wanting)
        donors = [s for s in self.table.open.values() if s.attributes.preemptible and s.bound]
        for s in sorted(wanting, key=lambda x: -x.priority):
            if not donors:
                return
            need = demand(s) - self._preempting
            if need <= 0:
                return
            for w in preemption_victims(s, donors, need):
                w.preempted = True
                self._preempting += 1
                self.unbind(w, f"preempted by session {s.id} (priority {s.priority})")
            donors = [d for d in donors if d.bound]

    def _rebalance(self, wanting: list[SessionState]) -> None:
        """Fair share among equal priorities: one worker at a time moves from the
        best-served session to one that has work and no worker (see ``scheduler``)."""
        for s in sorted(wanting, key=lambda x: -x.priority):
            donor = rebalance_donor(s, self.table.open.values())
            if donor is None:
                continue
            w = next(reversed(list(donor.bound.values())))  # newest binding first
            w.preempted = True
            self._preempting += 1
            self.unbind(w, f"rebalanced to session {s.id} (fair share)")
            return

    def expire_stalled(self, now: float, timeout_s: float) -> None:
        """Fail worker streams whose oldest batch in flight is older than ``timeout_s``."""
        for s in [*self.table.open.values(), *self.table.closing.values()]:
            for conn in list(s.streams):
                oldest = next(iter(conn.inflight.values()), None)
                if oldest is None or now - oldest.sent_at_s < timeout_s:
                    continue
                w = conn.worker
                log.warning(
                    "worker %s held batch %s of session %s for %.1f s: stream ended, "
                    "%d batch(es) re-queued",
                    w.id,
                    oldest.batch.id,
                    s.id,
                    now - oldest.sent_at_s,
                    len(conn.inflight),
                )
                self.flow.release_stream(conn, requeue=True)
                if w.bound is s:
                    self.unbind(w, "a batch timed out")

    def tick(self, now: float) -> None:
        """Worker timers: stalled batches, idle or stream-less bound workers; then schedule."""
        cfg = self.config
        if cfg.batch_timeout_s is not None:
            self.expire_stalled(now, cfg.batch_timeout_s)
        for w in list(self.workers.by_id.values()):
            bound = w.bound
            if bound is None:
                continue
            conn = w.streams.get(bound.id)
            quiet_s = now - w.last_activity_s
            if bound.tasks.batches == 0 and (conn is None or not conn.inflight):
                if quiet_s >= cfg.unbind_idle_after_s:
                    self.unbind(w, "nothing to do in the session")
            elif conn is None and now - w.bound_at_s >= cfg.stream_open_timeout_s:
                self.unbind(w, "no WorkerStream opened after BIND")
        self.schedule()
