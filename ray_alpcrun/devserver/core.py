"""The queue manager's state machine, without gRPC: sessions, client streams,
worker registrations and streams, the scheduler, and timers.

Every method runs on the server's event loop; the gRPC layer (``queue``)
translates requests into these calls and ``Rejected`` into status codes.

Decisions (the docs are silent):

* A worker may be sent BIND once it has reported IDLE on ``WorkerUpdate``
  (after registering, and again after every UNBIND). A worker that half-closed
  its ``WorkerUpdate`` (can no longer report) counts as idle as soon as it is
  unbound and its session streams have ended. IDLE/BUSY reports while bound
  are recorded only.
* UNBIND takes effect on the server at once: the worker no longer counts for
  the session and gets no new batches; its ``WorkerStream`` stays open until
  the batches in flight on it are answered, then the server ends it (OK).
  CloseSession ends the streams at once and discards what is in flight.
  When a bound worker's stream ends from its side (broken, half-closed), the
  worker is unbound as well (its batches in flight are re-queued).
* A session is reaped after ``idle_timeout`` without activity: no client
  stream open and nothing queued or in flight (results nobody fetched in that
  time are dropped with it).
* With ``batch_timeout_s`` set, a worker stream whose oldest batch in flight
  is older than that is failed like a broken one (batches re-queued, worker
  unbound, the server ends the stream); a late answer is then dropped.
* A closed session's id is remembered (``closed``) so that CloseSession is
  idempotent and ``join`` can tell "closed" from "unknown".
* Client streams: a stream attaches to every session it submits to (or names
  in the ``sessionid`` metadata; an empty batch only attaches). After the
  client half-closes, the server ends the stream (OK) once every task of its
  sessions has been answered and the results handed over. When the stream
  ends because the client went away (cancel, disconnect) and the session has
  ``cleanup_on_client_exit``, the session is closed once no other client
  stream of it is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from ulid import ULID

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import scheduler
from ray_alpcrun.devserver.attributes import new_attributes, updated_attributes
from ray_alpcrun.devserver.errors import Rejected, SessionClosed
from ray_alpcrun.devserver.flow import QueueStats, TaskFlow
from ray_alpcrun.devserver.sessions import SessionState
from ray_alpcrun.devserver.workers import ClientConn, StreamConn, Worker, WorkerRegistry
from ray_alpcrun.types import (
    Batch,
    Instruction,
    InstructionType,
    Session,
    WorkerState,
    WorkerStatus,
)

log = logging.getLogger("ray_alpcrun.devserver")

_CLOSED_REMEMBERED = 10_000


class QueueCore:
    """Sessions, workers and scheduling of one queue manager."""

    def __init__(self, config: DevServerConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.stats = QueueStats()
        self.sessions: dict[str, SessionState] = {}
        self.closed: OrderedDict[str, int] = OrderedDict()  # id -> tasks unanswered at close
        self.workers = WorkerRegistry()
        self.flow = TaskFlow(self.stats, clock, config.max_deliveries, self._work_queued)
        self._schedule_pending = False
        self._preempting = 0  # workers unbound by preemption, not yet idle again

    # --- sessions ----------------------------------------------------------

    def session(self, session_id: str) -> SessionState:
        s = self.sessions.get(session_id)
        if s is not None:
            return s
        if not session_id:
            raise Rejected("INVALID_ARGUMENT", "no session id given")
        if session_id in self.closed:
            raise Rejected("NOT_FOUND", f"session {session_id} was closed")
        raise Rejected("NOT_FOUND", f"session {session_id} not found")

    def create_session(self, req: Session) -> Session:
        if not req.app_id:
            raise Rejected("INVALID_ARGUMENT", "app.id is required to create a session")
        attrs = new_attributes(req.attributes)
        # A client may choose its id (e.g. to re-create a session after a restart).
        sid = req.id or str(ULID())
        if sid in self.sessions:
            raise Rejected("ALREADY_EXISTS", f"session {sid} already exists")
        self.closed.pop(sid, None)
        now = self.clock()
        s = SessionState(sid, req.app_id, attrs, created_s=now, last_activity_s=now)
        self.sessions[sid] = s
        self.stats.sessions_created += 1
        log.info(
            "session %s created: app=%s priority=%d max_workers=%s window=%d",
            sid,
            req.app_id,
            attrs.priority,
            attrs.max_workers,
            attrs.max_inflight_batches_per_worker,
        )
        return self.view(s)

    @staticmethod
    def view(s: SessionState) -> Session:
        return Session(id=s.id, app_id=s.app_id, attributes=s.attributes)

    def update_session(self, req: Session) -> None:
        s = self.session(req.id)
        s.attributes = updated_attributes(s.attributes, req.attributes)
        s.last_activity_s = self.clock()
        cap = s.attributes.max_workers
        if cap is not None and len(s.bound) > cap:
            for w in list(s.bound.values())[cap:]:
                self._unbind(w, "max_workers lowered")
        for conn in s.streams:  # the window may have grown
            conn.wake.set()
        log.info("session %s updated: %s", s.id, s.attributes)
        self.request_schedule()

    def close_session(self, session_id: str, reason: str = "closed by the client") -> None:
        s = self.sessions.get(session_id)
        if s is None:
            if session_id in self.closed:
                return  # idempotent
            self.session(session_id)  # raises the right error
            return
        del self.sessions[session_id]
        self.closed[session_id] = s.unanswered_tasks
        while len(self.closed) > _CLOSED_REMEMBERED:
            self.closed.popitem(last=False)
        for conn in list(s.streams):
            self.flow.release_stream(conn, requeue=False)
        for w in list(s.bound.values()):
            self._unbind(w, reason)
        s.tasks.clear()
        s.live.clear()
        for client in s.clients:
            client.sessions.remove(s)
            client.next_index = 0
            client.orphaned = not client.sessions
            client.wake.set()
        s.clients.clear()
        for fut in s.drained_waiters:
            if not fut.done():
                fut.set_result(None)
        s.drained_waiters.clear()
        self.stats.sessions_closed += 1
        log.info("session %s closed (%s), %d task(s) unanswered", s.id, reason, s.unanswered_tasks)
        self.request_schedule()

    async def wait_drained(self, session_id: str) -> None:
        """Return once every task of the session is answered and its results were
        handed to a client stream."""
        loop = asyncio.get_running_loop()
        while True:
            s = self.sessions.get(session_id)
            if s is None:
                if session_id in self.closed:
                    left = self.closed[session_id]
                    if left:
                        raise SessionClosed(f"session {session_id} closed with {left} unanswered")
                    return
                self.session(session_id)  # raises NOT_FOUND
            assert s is not None
            if s.drained:
                return
            fut: asyncio.Future[None] = loop.create_future()
            s.drained_waiters.append(fut)
            await fut

    def take_dead_letters(self, session_id: str) -> list[Batch]:
        """Drain the session's dead-letter queue."""
        s = self.session(session_id)
        out = list(s.dead_letters)
        s.dead_letters.clear()
        return out

    def return_dead_letters(self, session_id: str, batches: list[Batch]) -> None:
        """Put back dead letters a broken stream did not deliver."""
        s = self.sessions.get(session_id)
        if s is not None:
            s.dead_letters.extendleft(reversed(batches))

    # --- client streams ----------------------------------------------------

    def open_client(self, session_id: str) -> ClientConn:
        conn = ClientConn()
        if session_id:
            self._attach(conn, self.session(session_id))
        return conn

    def _attach(self, conn: ClientConn, s: SessionState) -> None:
        if conn not in s.clients:
            s.clients.add(conn)
            conn.sessions.append(s)
            s.last_activity_s = self.clock()
            conn.wake.set()

    def submit(self, conn: ClientConn, batch: Batch, default_session_id: str) -> None:
        sid = batch.session_id or default_session_id
        if not sid:
            raise Rejected(
                "INVALID_ARGUMENT",
                "batch has no session_id (set Batch.session_id or the 'sessionid' metadata)",
            )
        s = self.session(sid)
        self._attach(conn, s)
        if batch.messages:
            self.flow.submit(s, batch)

    async def next_result(self, conn: ClientConn) -> Batch | None:
        """The next result batch for a client stream; None when the stream should end."""
        while True:
            if conn.failure is not None:
                raise conn.failure
            batch = self.flow.take_result(conn)
            if batch is not None:
                return batch
            if conn.orphaned:
                return None
            if conn.half_closed and all(s.drained for s in conn.sessions):
                return None
            conn.wake.clear()
            await conn.wake.wait()

    def close_client(self, conn: ClientConn, client_gone: bool) -> None:
        for s in conn.sessions:
            s.clients.discard(conn)
            s.last_activity_s = self.clock()
            if client_gone and s.attributes.cleanup_on_client_exit and not s.clients:
                self.close_session(s.id, "client exited (cleanup_on_client_exit)")
        conn.sessions = []

    # --- workers -----------------------------------------------------------

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
            self.flow.release_stream(conn, requeue=True)
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

    def _bind(self, w: Worker, s: SessionState) -> None:
        self.workers.set_eligible(w, False)
        now = self.clock()
        w.bound = s
        w.bound_at_s = now
        w.last_activity_s = now
        s.bound[w.id] = w
        w.outbox.put_nowait(Instruction(InstructionType.BIND, s.id))
        self.stats.binds += 1
        log.info("BIND worker %s -> session %s (priority %d)", w.id, s.id, s.priority)

    def _unbind(self, w: Worker, reason: str) -> None:
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
        s = self.session(session_id)
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
            self.flow.release_stream(conn, requeue=True)
        w = conn.worker
        if ended_by_worker and w.bound is conn.session and conn.session.id not in w.streams:
            # A worker that lost its stream would otherwise hold a place in the session
            # without doing anything; the seed's worker only opens a stream after BIND.
            self._unbind(w, "its WorkerStream ended")
        self._maybe_idle_without_report(w)
        self.request_schedule()

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

    def _work_queued(self, s: SessionState) -> None:
        # Per batch, scheduling matters only when a worker is free or the session just
        # got work; everything else (e.g. more preemption for a growing queue) is
        # picked up by the next tick.
        if self.workers.eligible or s.tasks.batches == 1:
            self.request_schedule()

    def schedule(self) -> None:
        """Bind eligible workers to the sessions that want them; preempt if needed."""
        self._schedule_pending = False
        wanting = [s for s in self.sessions.values() if s.wants_worker()]
        eligible = self.workers.eligible
        while wanting and eligible:
            s = scheduler.best_session(wanting)
            assert s is not None
            self._bind(next(iter(eligible.values())), s)
            if not s.wants_worker():
                wanting.remove(s)
        if not wanting:
            return
        donors = [s for s in self.sessions.values() if s.attributes.preemptible and s.bound]
        for s in sorted(wanting, key=lambda x: -x.priority):
            if not donors:
                return
            need = scheduler.demand(s) - self._preempting
            if need <= 0:
                return
            for w in scheduler.preemption_victims(s, donors, need):
                w.preempted = True
                self._preempting += 1
                self._unbind(w, f"preempted by session {s.id} (priority {s.priority})")
            donors = [d for d in donors if d.bound]

    def _expire_stalled(self, now: float, timeout_s: float) -> None:
        """Fail worker streams whose oldest batch in flight is older than ``timeout_s``."""
        for s in list(self.sessions.values()):
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
                    self._unbind(w, "a batch timed out")

    def tick(self, now: float | None = None) -> None:
        """Reap idle sessions and unbind idle or stuck workers."""
        now = self.clock() if now is None else now
        for s in list(self.sessions.values()):
            idle_s = s.attributes.idle_timeout_s or 0.0
            if (
                not s.clients
                and s.tasks.batches == 0
                and s.inflight_batches == 0
                and now - s.last_activity_s >= idle_s
            ):
                self.close_session(s.id, f"idle for {idle_s:g} s")
            elif s.tasks.batches and s.hungry:
                s.wake_one_hungry()  # a safety net; wake-ups are passed on as they happen
        cfg = self.config
        if cfg.batch_timeout_s is not None:
            self._expire_stalled(now, cfg.batch_timeout_s)
        for w in list(self.workers.by_id.values()):
            bound = w.bound
            if bound is None:
                continue
            conn = w.streams.get(bound.id)
            quiet_s = now - w.last_activity_s
            if bound.tasks.batches == 0 and (conn is None or not conn.inflight):
                if quiet_s >= cfg.unbind_idle_after_s:
                    self._unbind(w, "nothing to do in the session")
            elif conn is None and now - w.bound_at_s >= cfg.stream_open_timeout_s:
                self._unbind(w, "no WorkerStream opened after BIND")
        self.schedule()
