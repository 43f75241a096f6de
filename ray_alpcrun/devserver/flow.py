"""Task and result flow inside a session: queue a client's batch, hand batches
to worker streams within the in-flight window, take result batches back
(first answer wins), re-queue or dead-letter what was not answered, and hand
results to client streams.

The invariant kept here: every submitted task ends up exactly once either in
a result batch handed to a client or in a dead-lettered batch (unless the
session is closed first, which discards it on purpose).

Decisions (the docs are silent):

* A batch stays in flight on one worker stream until a result batch with the
  same id arrives *on that stream*. A result for a batch that is not in flight
  there (already re-queued, answered, or unknown) is dropped and counted in
  ``dropped_results``; it is never delivered twice.
* A batch re-queued after ``max_deliveries`` deliveries goes to dead letters
  with the error "delivered N times without an answer".
* When a worker stream ends (broken, or the worker half-closed), its batches
  in flight go back to the front of the queue. When it broke (cancelled, or
  its requests failed), the other streams of its connection (gRPC's peer
  address: one worker process's logical workers share it) get no batch for
  ``LOST_PEER_S``: a worker process that dies breaks them all within
  milliseconds, and handing them its batches meanwhile used up two of a batch's
  three deliveries in one fault (a killed node bridge, then a lost node, and a
  batch was dead-lettered).
* A result batch answers the tasks whose id (``related_id``, else ``id``)
  matches a task of the batch in flight; unknown or repeated answers are
  dropped. ``related_id`` (and an empty ``id``) is filled in with the task id
  when the worker left it out; an answer with neither ``id`` nor
  ``related_id`` answers the task at the same position in the batch.
  Tasks a result batch does not answer go back to the queue as a batch
  with the same id (the client may therefore see one batch id in several
  result batches); their delivery count carries over.
* A result batch without an ``id`` (the guide's shared-data example answers
  so) is matched to the batch in flight on its stream that holds the task its
  first message's ``related_id`` names.
* A dead-lettered batch holds the original task payloads (so it can be
  resubmitted), ``dead=True`` and an ``error`` on every message: the worker's
  error for that task when it gave one, else the reason. It is built by
  ``answers.dead_letters``, so it fits ``max_message_bytes``: one dead-lettered
  batch may come out as several dead letters with the same id.
* A result batch that grew past ``max_message_bytes`` here (ids filled in, the
  client's batch id and session id set) goes to the client in several parts with
  the same id; the client matches answers by task id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ulid import ULID

from ray_alpcrun.answers import dead_letters, fit
from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.devserver.model import ClientConn, Pending, SessionState, StreamConn
from ray_alpcrun.types import Batch, Message
from ray_alpcrun.wire import batch_header_bytes

log = logging.getLogger("ray_alpcrun.devserver")

# After a stream of a connection broke, its other streams get no batch this long.
LOST_PEER_S = 0.5


@dataclass
class QueueStats:
    """Counters for tests and benchmarks (``LocalServices.stats()``)."""

    sessions_created: int = 0
    sessions_closed: int = 0
    submitted_tasks: int = 0
    submitted_batches: int = 0
    deliveries: int = 0
    redeliveries: int = 0
    result_batches: int = 0
    result_tasks: int = 0
    partial_results: int = 0
    dropped_results: int = 0
    dead_lettered_batches: int = 0
    dead_lettered_tasks: int = 0
    binds: int = 0
    unbinds: int = 0
    workers_registered: int = 0
    max_inflight_seen_per_worker: dict[str, int] = field(default_factory=dict)


class TaskFlow:
    """Moves batches between client streams, session queues and worker streams."""

    def __init__(
        self,
        stats: QueueStats,
        clock: Callable[[], float],
        max_deliveries: int,
        on_work: Callable[[SessionState], None],
        max_message_bytes: int,
    ) -> None:
        self.stats = stats
        self._clock = clock
        self._max_deliveries = max_deliveries
        self._max_message_bytes = max_message_bytes
        self._on_work = on_work  # work was queued: the scheduler may want to bind a worker
        self._lost_peers: dict[str, float] = {}  # connection -> when one of its streams broke

    # --- client side -------------------------------------------------------

    def submit(self, s: SessionState, batch: Batch) -> None:
        """Queue a client's task batch; ids are assigned where empty."""
        msgs = batch.messages
        batch.session_id = s.id
        if not batch.id:
            batch.id = str(ULID())
        for i, m in enumerate(msgs):
            if not m.id:
                m.id = f"{batch.id}.{i}"
        if len(msgs) > 1 and len({m.id for m in msgs}) != len(msgs):
            raise Rejected("INVALID_ARGUMENT", f"batch {batch.id} repeats a task id")
        p = Pending(batch)
        if batch.id in s.live:  # reused while the first is live: travel under a unique id
            p.client_batch_id = batch.id
            batch.id = f"{batch.id}~{ULID()}"
        s.live[batch.id] = p
        s.tasks.push(p)
        n = len(msgs)
        s.submitted_tasks += n
        self.stats.submitted_tasks += n
        self.stats.submitted_batches += 1
        s.last_activity_s = self._clock()
        s.wake_one_hungry()
        self._on_work(s)

    def take_result(self, conn: ClientConn) -> Batch | None:
        """The next result batch for this client stream, round robin over its sessions."""
        sessions = conn.sessions
        n = len(sessions)
        for k in range(n):
            idx = (conn.next_index + k) % n
            s = sessions[idx]
            if s.results:
                conn.next_index = (idx + 1) % n
                batch = s.results.popleft()
                s.handed_tasks += len(batch.messages)
                s.last_activity_s = self._clock()
                s.notify_if_drained()
                return batch
        return None

    # --- worker side -------------------------------------------------------

    async def next_batch(self, conn: StreamConn) -> Batch | None:
        """The next task batch for a worker stream; None when the stream should end."""
        s = conn.session
        while True:
            s.hungry.pop(conn, None)
            if conn.failure is not None:
                raise conn.failure
            if conn.closed or conn.peer_done:
                return None
            if conn.draining:
                if not conn.inflight:
                    return None
            elif (wait := self._peer_lost_for(conn)) > 0:
                # Its connection is breaking: leave the batches to other streams.
                s.wake_one_hungry()
                conn.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.wake.wait(), wait)
                continue
            elif len(conn.inflight) < s.window:
                p = s.tasks.pop()
                if p is not None:
                    return self._deliver(conn, p)
                s.hungry[conn] = None
            conn.wake.clear()
            await conn.wake.wait()

    def connection_lost(self, peer: str) -> None:
        """A stream of connection ``peer`` broke: the others are about to (module doc)."""
        if peer:
            now = time.monotonic()  # real time, not the injected clock: it is the transport's
            self._lost_peers = {p: t for p, t in self._lost_peers.items() if now - t < LOST_PEER_S}
            self._lost_peers[peer] = now

    def _peer_lost_for(self, conn: StreamConn) -> float:
        """Seconds ``conn`` still gets no batch because its connection broke (0: none)."""
        since = self._lost_peers.get(conn.peer) if conn.peer else None
        return 0.0 if since is None else max(0.0, LOST_PEER_S - (time.monotonic() - since))

    def _deliver(self, conn: StreamConn, p: Pending) -> Batch:
        s = conn.session
        p.deliveries += 1
        stats = self.stats
        stats.deliveries += 1
        if p.deliveries > 1:
            stats.redeliveries += 1
        conn.inflight[p.batch.id] = p
        s.inflight_batches += 1
        w = conn.worker
        depth = len(conn.inflight)
        if depth > stats.max_inflight_seen_per_worker.get(w.id, 0):
            stats.max_inflight_seen_per_worker[w.id] = depth
        now = self._clock()
        p.sent_at_s = now
        w.last_activity_s = now
        s.last_activity_s = now
        log.debug("batch %s delivered to worker %s (delivery %d)", p.batch.id, w.id, p.deliveries)
        return p.batch

    def on_result(self, conn: StreamConn, result: Batch) -> None:
        """A result batch arrived on a worker stream."""
        s = conn.session
        if conn.closed:
            self._drop(conn, result, "the stream was closed")
            return
        p = conn.inflight.pop(result.id or self._batch_of(conn, result), None)
        if p is None:
            self._drop(conn, result, "the batch is not in flight on this worker")
            return
        if result.session_id and result.session_id != s.id:
            log.warning(
                "result batch %s names session %s but arrived on a stream of session %s",
                result.id,
                result.session_id,
                s.id,
            )
        s.inflight_batches -= 1
        now = self._clock()
        conn.worker.last_activity_s = now
        s.last_activity_s = now
        conn.wake.set()  # the window has room again
        if result.dead:
            errors = {(m.related_id or m.id): m.error for m in result.messages if m.error}
            self.dead_letter(s, p, "the worker marked the batch dead", errors)
            return
        header_bytes = batch_header_bytes(result)
        unlabelled = any(m.related_id is None or not m.id for m in result.messages)
        answers, rest = split_answers(p, result)
        if answers:
            result.id = p.reply_id
            result.session_id = s.id
            result.priority = p.batch.priority
            if unlabelled or batch_header_bytes(result) > header_bytes:
                # It arrived within the limit: only what was added here can break it.
                s.results.extend(fit(result, answers, self._max_message_bytes, keep_payloads=True))
            else:
                result.messages = answers
                s.results.append(result)
            self.stats.result_batches += 1
            self.stats.result_tasks += len(answers)
            s.wake_clients()
        if rest:
            self.stats.partial_results += 1
            log.info(
                "batch %s of session %s: %d task(s) unanswered by worker %s, re-queued",
                p.batch.id,
                s.id,
                len(rest),
                conn.worker.id,
            )
            rp = remainder(p, rest)
            s.live[rp.batch.id] = rp
            self.requeue(s, rp)
        else:
            s.live.pop(p.batch.id, None)

    @staticmethod
    def _batch_of(conn: StreamConn, result: Batch) -> str:
        """The id of the batch in flight on ``conn`` whose task the result's first
        ``related_id`` names ("" if none): for result batches sent without an id."""
        first = next((m.related_id for m in result.messages if m.related_id), None)
        if first is None:
            return ""
        for batch_id, p in conn.inflight.items():
            if any(t.id == first for t in p.batch.messages):
                return batch_id
        return ""

    def _drop(self, conn: StreamConn, result: Batch, why: str) -> None:
        self.stats.dropped_results += 1
        log.info(
            "dropping result batch %s from worker %s (session %s): %s",
            result.id,
            conn.worker.id,
            conn.session.id,
            why,
        )

    def requeue(self, s: SessionState, p: Pending) -> None:
        """Put a batch back at the front of its priority, or dead-letter it."""
        if p.deliveries >= self._max_deliveries:
            self.dead_letter(s, p, f"delivered {p.deliveries} times without an answer")
            return
        if s.closing:
            self.dead_letter(s, p, "the session was closed before it was answered")
            return
        s.tasks.push_front(p)
        s.wake_one_hungry()
        self._on_work(s)

    def dead_letter(
        self,
        s: SessionState,
        p: Pending,
        reason: str,
        worker_errors: dict[str, str] | None = None,
    ) -> None:
        s.live.pop(p.batch.id, None)
        s.dead_letters.extend(
            dead_letters(
                p.batch, reason, self._max_message_bytes, worker_errors, batch_id=p.reply_id
            )
        )
        n = len(p.batch.messages)
        s.dead_tasks += n
        self.stats.dead_lettered_batches += 1
        self.stats.dead_lettered_tasks += n
        log.warning(
            "batch %s of session %s (%d task(s)) dead-lettered: %s", p.batch.id, s.id, n, reason
        )
        s.notify_if_drained()
        s.wake_clients()  # a half-closed client stream may now be complete

    def release_stream(self, conn: StreamConn, requeue: bool) -> None:
        """Detach a worker stream; its batches in flight go back to the queue if
        ``requeue`` (else they are discarded with the session). Idempotent."""
        s = conn.session
        if conn.inflight:
            items = list(conn.inflight.values())
            conn.inflight.clear()
            s.inflight_batches -= len(items)
            if requeue:
                log.info(
                    "worker %s left session %s with %d batch(es) in flight: re-queued (%s)",
                    conn.worker.id,
                    s.id,
                    len(items),
                    " ".join(p.batch.id for p in items),
                )
                for p in reversed(items):  # front pushes: keep the original order
                    self.requeue(s, p)
        s.streams.discard(conn)
        s.hungry.pop(conn, None)
        if s.tasks.batches:
            # This stream may have taken a wake-up meant for a batch it will now
            # never fetch: pass it on.
            s.wake_one_hungry()
        w = conn.worker
        if w.streams.get(s.id) is conn:
            del w.streams[s.id]
        conn.closed = True
        conn.wake.set()


def split_answers(pending: Pending, result: Batch) -> tuple[list[Message], list[Message]]:
    """(answers, unanswered tasks) of ``pending`` given the worker's ``result``."""
    tasks = pending.batch.messages
    if len(tasks) == 1 and len(result.messages) == 1:
        # Fast path: the common one-task batch needs no index.
        answer = result.messages[0]
        key = answer.related_id or answer.id or tasks[0].id
        if key == tasks[0].id:
            _label(answer, key)
            return [answer], []
        return [], tasks
    by_id = {t.id: t for t in tasks}
    answers: list[Message] = []
    for position, answer in enumerate(result.messages):
        key = answer.related_id or answer.id
        if not key and position < len(tasks):
            key = tasks[position].id  # an answer without ids answers the task at its place
        if by_id.pop(key, None) is None:
            continue
        _label(answer, key)
        answers.append(answer)
    return answers, list(by_id.values())


def _label(answer: Message, task_id: str) -> None:
    if answer.related_id is None:
        answer.related_id = task_id
    if not answer.id:
        answer.id = task_id


def remainder(pending: Pending, tasks: list[Message]) -> Pending:
    """The unanswered part of a batch, same id and options, same delivery count."""
    b = pending.batch
    return Pending(
        Batch(
            id=b.id,
            session_id=b.session_id,
            priority=b.priority,
            messages=tasks,
            use_shared_data=b.use_shared_data,
            required_shared_data_update_level=b.required_shared_data_update_level,
        ),
        pending.deliveries,
        pending.client_batch_id,
    )
