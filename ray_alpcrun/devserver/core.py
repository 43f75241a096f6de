"""The queue manager's state machine, without gRPC: sessions, client streams
and timers; the worker side is ``binding.WorkerBinding`` (``core.binding``),
which shares only the ``SessionTable`` with it.

Every method runs on the server's event loop; the gRPC layer (``queue``)
translates requests into these calls and ``Rejected`` into status codes.

Decisions (the docs are silent):

* A session is reaped after ``idle_timeout`` without activity: no client
  stream open and nothing queued or in flight (results nobody fetched in that
  time are dropped with it).
* A closed session's id is remembered (``SessionTable.closed``) so that
  CloseSession is idempotent and ``join`` can tell "closed" from "unknown".
* CloseSession (the docs: "queues are drained only if cleanup_on_client_exit"):
  with it, queues are emptied at once; without, queued batches become dead
  letters, in-flight ones are answered, and the session stays readable
  (``closing``) until drained and its clients gone, or ``idle_timeout``.
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
from collections.abc import Callable

from ulid import ULID

from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver.attributes import new_attributes, updated_attributes
from ray_alpcrun.devserver.binding import WorkerBinding
from ray_alpcrun.devserver.errors import Rejected, SessionClosed
from ray_alpcrun.devserver.flow import QueueStats
from ray_alpcrun.devserver.model import ClientConn, SessionState, SessionTable
from ray_alpcrun.types import Batch, SessionInfo

log = logging.getLogger("ray_alpcrun.devserver")


class QueueCore:
    """Sessions, workers and scheduling of one queue manager."""

    def __init__(self, config: DevServerConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.stats = QueueStats()
        self.table = SessionTable()
        self.sessions = self.table.open  # the open sessions, by id
        self.binding = WorkerBinding(config, clock, self.stats, self.table)
        self.flow = self.binding.flow
        self.workers = self.binding.workers

    # --- sessions ----------------------------------------------------------

    def session(self, session_id: str) -> SessionState:
        """The open session, or ``Rejected`` (NOT_FOUND, INVALID_ARGUMENT)."""
        return self.table.get(session_id)

    def create_session(self, req: SessionInfo) -> SessionInfo:
        if not req.app_id:
            raise Rejected("INVALID_ARGUMENT", "app.id is required to create a session")
        attrs = new_attributes(req.attributes)
        # A client may choose its id (e.g. to re-create a session after a restart).
        sid = req.id or str(ULID())
        if sid in self.sessions:
            raise Rejected("ALREADY_EXISTS", f"session {sid} already exists")
        self.table.closed.pop(sid, None)
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
    def view(s: SessionState) -> SessionInfo:
        return SessionInfo(id=s.id, app_id=s.app_id, attributes=s.attributes)

    def update_session(self, req: SessionInfo) -> None:
        s = self.session(req.id)
        s.attributes = updated_attributes(s.attributes, req.attributes)
        s.last_activity_s = self.clock()
        cap = s.attributes.max_workers
        if cap is not None and len(s.bound) > cap:
            for w in list(s.bound.values())[cap:]:
                self.binding.unbind(w, "max_workers lowered")
        for conn in s.streams:  # the window may have grown
            conn.wake.set()
        log.info("session %s updated: %s", s.id, s.attributes)
        self.binding.request_schedule()

    def close_session(self, session_id: str, reason: str = "closed by the client") -> None:
        """Unbind every worker and remove the session. With ``cleanup_on_client_exit``
        its queues are emptied at once (streams ended, work in flight discarded);
        without, nothing submitted is lost: queued batches become dead letters, the
        batches in flight are answered, and results and dead letters stay readable
        by the client streams attached to it until it is drained."""
        s = self.table.open.get(session_id)
        if s is None:
            if session_id in self.table.closed or session_id in self.table.closing:
                return  # idempotent
            self.session(session_id)  # raises the right error
            return
        cleanup = s.attributes.cleanup_on_client_exit
        del self.table.open[session_id]
        for w in list(s.bound.values()):
            self.binding.unbind(w, reason)
        self.stats.sessions_closed += 1
        if cleanup:
            self._discard(s)
        else:
            s.closing = True
            self.table.closing[s.id] = s
            while (p := s.tasks.pop()) is not None:
                self.flow.dead_letter(s, p, f"the session was closed before it ran ({reason})")
            self._finish_if_drained(s)
        log.info(
            "session %s closed (%s), %d task(s) unanswered%s",
            s.id,
            reason,
            s.unanswered_tasks,
            ", queues emptied" if cleanup else "",
        )
        self.binding.request_schedule()

    def _discard(self, s: SessionState) -> None:
        """Forget ``s`` with whatever it still holds; its streams end now."""
        self.table.forget(s)
        for conn in list(s.streams):
            self.flow.release_stream(conn, requeue=False)
        s.tasks.clear()
        s.live.clear()
        self._detach_clients(s)
        for fut in s.drained_waiters:
            if not fut.done():
                fut.set_result(None)
        s.drained_waiters.clear()

    def _detach_clients(self, s: SessionState) -> None:
        for client in s.clients:
            client.sessions.remove(s)
            client.next_index = 0
            client.orphaned = not client.sessions
            client.wake.set()
        s.clients.clear()

    def _finish_if_drained(self, s: SessionState) -> None:
        """A closing session whose every task was handed out lets its client streams
        go; it is forgotten once idle (its dead letters are read until then)."""
        if s.closing and s.drained and s.clients:
            self._detach_clients(s)

    async def wait_drained(self, session_id: str) -> None:
        """Return once every task of the session is answered and its results were
        handed to a client stream."""
        loop = asyncio.get_running_loop()
        while True:
            s = self.table.open.get(session_id) or self.table.closing.get(session_id)
            if s is None:
                if session_id in self.table.closed:
                    left = self.table.closed[session_id]
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
        """Drain the session's dead-letter queue (a closing session's too)."""
        s = self.table.closing.get(session_id) or self.session(session_id)
        out = list(s.dead_letters)
        s.dead_letters.clear()
        return out

    def return_dead_letters(self, session_id: str, batches: list[Batch]) -> None:
        """Put back dead letters a broken stream did not deliver."""
        s = self.table.open.get(session_id) or self.table.closing.get(session_id)
        if s is not None:
            s.dead_letters.extendleft(reversed(batches))

    def return_result(self, batch: Batch) -> None:
        """Put back a result batch a broken client stream did not deliver: the
        session's next client stream hands it out (answers are matched by task
        id there, so one that did arrive after all is ignored, not doubled)."""
        s = self.table.open.get(batch.session_id) or self.table.closing.get(batch.session_id)
        if s is not None:
            s.results.appendleft(batch)
            s.handed_tasks -= len(batch.messages)
            s.wake_clients()

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
            for s in [x for x in conn.sessions if x.closing]:
                self._finish_if_drained(s)
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
            if s.closing:
                continue
            if client_gone and s.attributes.cleanup_on_client_exit and not s.clients:
                self.close_session(s.id, "client exited (cleanup_on_client_exit)")
        conn.sessions = []

    def tick(self, now: float | None = None) -> None:
        """Reap idle sessions, then the worker timers (``WorkerBinding.tick``)."""
        now = self.clock() if now is None else now
        for s in list(self.table.closing.values()):
            idle_s = s.attributes.idle_timeout_s or 0.0
            if not s.clients and not s.inflight_batches and now - s.last_activity_s >= idle_s:
                self._discard(s)  # what nobody fetched within idle_timeout goes with it
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
        self.binding.tick(now)
