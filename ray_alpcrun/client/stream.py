"""One session's ``ClientStream`` and the routing of answers back to submissions.

A session has at most one open ``ClientStream``: the queue manager streams a
session's results to whichever client stream of that session is open, so
concurrent ``submit`` calls share one stream and answers are routed by task id
(``related_id``, falling back to ``id``). Dead letters do not come down the
stream; while tasks are outstanding ``ClientStreamDeadLetters`` is polled and
dead-lettered tasks count as answered. A task is answered at most once: its
entry leaves the routing table on the first answer, later ones are ignored.

A queue manager refuses a message over its limit by ending the stream it came
on (RESOURCE_EXHAUSTED, "Received message larger than max (A vs. B)"); gRPC
may even report that as INTERNAL when a write was under way. So a batch larger
than the queue manager is known to take (gRPC's default 4 MiB, or the largest
batch it answered) is not written on the shared stream: it goes alone on a
*probe*, a second ``ClientStream`` call of the session, half-closed at once,
which also carries results until the session is drained. If the probe is
refused, the stream learns the limit B from gRPC's message and sends the
batch's tasks again on the shared stream, cut to B; a task over B fails alone
with an error naming B and ``Client(max_message_bytes=...)``. Nothing else is
lost or sent twice. One probe is in flight at a time: another batch that needs
one waits until the first is answered or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.client.batching import pack
from ray_alpcrun.client.limits import refused_limit, too_large, usable_bytes
from ray_alpcrun.client.results import DEAD_LETTER_ERROR, Submission, TaskResult
from ray_alpcrun.rpc import QueueStub
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES, Metadata, translate
from ray_alpcrun.types import Batch, SessionInfo
from ray_alpcrun.wire import batch_bytes, batch_header_bytes

log = logging.getLogger(__name__)

DIAGNOSE_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Probe:
    """A batch written alone on its own call (see the module docstring)."""

    batch: Batch
    size: int
    ids: set[str] = field(init=False)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # answered or refused

    def __post_init__(self) -> None:
        self.ids = {m.id for m in self.batch.messages}


class ClientStream:
    """One session's ``ClientStream`` call: owns it, its reader task and the dead-letter poller."""

    def __init__(
        self,
        stub: QueueStub,
        session_id: str,
        metadata: Metadata,
        dead_letter_poll_s: float,
        explain: Callable[[grpc.RpcError], errors.RpcError] = translate,
        keep_dead_letter: Callable[[Batch], None] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        queue_max_message_bytes: int | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self._stub = stub
        self._explain = explain
        # Reading dead letters drains them on the server: hand every batch read
        # to the session so ``dead_letters()`` can still return it.
        self._keep_dead_letter = keep_dead_letter
        self.session_id = session_id
        self._metadata = metadata
        self._poll_s = dead_letter_poll_s
        self._call: grpc.aio.StreamStreamCall[Batch, Batch] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        # task id -> (submission, index in that submission's input)
        self._pending: dict[str, tuple[Submission, int]] = {}
        self._subs: set[Submission] = set()
        self.failure: errors.AlpcrunError | None = None
        self.ignored = 0  # answers for unknown or already answered tasks
        self.late = 0  # answers after the stream failed (its tasks were failed with it)
        # What the queue manager takes (see the module docstring): the limit it
        # named when it refused a batch, else at least ``_taken_bytes``.
        self._max_message_bytes = max_message_bytes
        self._queue_limit = queue_max_message_bytes
        self._on_refused = on_refused
        self._taken_bytes = min(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)
        self._probe: _Probe | None = None
        self._probe_calls: set[asyncio.Task[None]] = set()  # their readers
        self._dead_letters_read = asyncio.Event()  # set while no poller call is under way
        self._dead_letters_read.set()
        self.probes = 0  # batches sent on a probe
        self.refusals = 0  # probes the queue manager refused

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def open(self) -> None:
        self._call = self._stub.ClientStream(None, metadata=self._metadata)
        self._reader = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"alpcrun-results-{self.session_id}"
        )

    def attach(self, sub: Submission) -> None:
        if self.failure is not None:
            raise self.failure
        self._subs.add(sub)

    def detach(self, sub: Submission) -> None:
        """Forget a finished or abandoned submission; its late answers are ignored."""
        self._subs.discard(sub)
        if sub.outstanding:
            for task_id in [k for k, (s, _) in self._pending.items() if s is sub]:
                del self._pending[task_id]
            self._stop_poller_if_idle()

    async def send(self, sub: Submission, batch: Batch, first_index: int) -> None:
        """Register the batch's tasks, then write it (answers may beat the write's return)."""
        if self.failure is not None:
            raise self.failure
        pending = self._pending
        for offset, message in enumerate(batch.messages):
            pending[message.id] = (sub, first_index + offset)
        sub.sent += len(batch.messages)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_dead_letters(), name=f"alpcrun-dead-letters-{self.session_id}"
            )
        await self._deliver(batch)

    async def _deliver(self, batch: Batch) -> None:
        """Write ``batch`` where it can go: on the shared stream, on a probe when
        it is larger than the queue manager is known to take, or cut to the limit
        it named (tasks over it fail alone)."""
        size = batch_bytes(batch)
        while True:
            if self.failure is not None:
                raise self.failure
            limit = self._queue_limit
            if limit is not None:
                if size > usable_bytes(limit):
                    await self._deliver_cut(batch, limit)
                    return
                break
            if size <= self._taken_bytes:
                break
            if self._probe is None:
                self._start_probe(batch, size)
                return
            await self._probe.settled.wait()
        await self._write(batch)

    async def _deliver_cut(self, batch: Batch, limit: int) -> None:
        messages = [m for m in batch.messages if m.id in self._pending]
        for k, part in enumerate(pack(messages, batch_header_bytes(batch), usable_bytes(limit))):
            if not part.fits:
                task = part.messages[0]
                error = too_large("task payload", len(task.payload), self._max_message_bytes, limit)
                self._fail_task(task.id, error, batch.id)
                continue
            piece = Batch(
                id=batch.id if k == 0 else f"{batch.id}.{k}",
                session_id=batch.session_id,
                priority=batch.priority,
                messages=part.messages,
                use_shared_data=batch.use_shared_data,
                required_shared_data_update_level=batch.required_shared_data_update_level,
            )
            await self._write(piece)

    async def _write(self, batch: Batch) -> None:
        """Write on the shared stream."""
        try:
            async with self._write_lock:
                if self._call is None:
                    raise asyncio.InvalidStateError("the stream was closed")
                await self._call.write(batch)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            # The reader sees the call's final status; prefer that explanation.
            await self._settle_reader()
            if self.failure is None:
                self._fail(self._broken(exc))
            raise self.failure or self._broken(exc) from exc

    def _fail_task(self, task_id: str, error: str, batch_id: str) -> None:
        """Answer a task the client cannot send with ``error``."""
        entry = self._pending.pop(task_id, None)
        if entry is not None:
            sub, index = entry
            sub.deliver([TaskResult(task_id, index, None, error, False, batch_id)])
            self._stop_poller_if_idle()

    # --- probes ---------------------------------------------------------------

    def _start_probe(self, batch: Batch, size: int) -> None:
        probe = _Probe(batch, size)
        self._probe = probe
        self.probes += 1
        call = self._stub.ClientStream(None, metadata=self._metadata)
        task = asyncio.get_running_loop().create_task(
            self._run_probe(probe, call), name=f"alpcrun-probe-{self.session_id}"
        )
        self._probe_calls.add(task)
        task.add_done_callback(self._probe_calls.discard)

    def _settle(self, probe: _Probe, taken: bool) -> None:
        if taken:
            self._taken_bytes = max(self._taken_bytes, probe.size)
        if self._probe is probe:
            self._probe = None
        probe.settled.set()

    async def _run_probe(
        self, probe: _Probe, call: grpc.aio.StreamStreamCall[Batch, Batch]
    ) -> None:
        """Write the probe's batch, then read its call like the shared one until it ends."""
        try:
            await call.write(probe.batch)
            # Half-closed: the queue manager ends it once the session is drained.
            try:
                await call.done_writing()
            except Exception:  # it ended meanwhile (grpc raises its own type here): read() says how
                log.debug("session %s: probe ended before its half-close", self.session_id)
            while True:
                batch = await call.read()
                if not isinstance(batch, Batch):  # grpc.aio.EOF
                    break
                self._route(batch, dead=bool(batch.dead))
        except grpc.RpcError as exc:
            limit = refused_limit(exc)
            if limit is None or limit >= self._max_message_bytes or probe.size <= limit:
                self._fail(self._explain(exc))  # not a refusal: its tasks are lost with it
                return
            await self._refused(probe, limit, exc)
        finally:
            call.cancel()
            self._settle(probe, taken=False)

    async def _refused(self, probe: _Probe, limit: int, exc: grpc.RpcError) -> None:
        self.refusals += 1
        log.warning(
            "session %s: the queue manager refused a batch of %d bytes (%s); "
            "its tasks go again within its limit of %d bytes",
            self.session_id,
            probe.size,
            exc.details(),
            limit,
        )
        if self._queue_limit is None or limit < self._queue_limit:
            self._queue_limit = limit
            if self._on_refused is not None:
                self._on_refused(limit)
        self._settle(probe, taken=False)
        with contextlib.suppress(errors.AlpcrunError):  # the shared stream failed: reported
            await self._deliver_cut(probe.batch, limit)

    async def close(self) -> None:
        """Half-close the stream and stop the background tasks; idempotent."""
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()
            call.cancel()
        poller = self._poller
        if poller is not None and self._reading_dead_letters:
            # Dead letters on their way are handed out once: let it keep them.
            await asyncio.wait({poller}, timeout=DIAGNOSE_TIMEOUT_S)
        for task in (self._reader, self._poller, *self._probe_calls):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._poller = None
        if self.failure is None:
            self._fail(errors.AlpcrunError(f"session {self.session_id}: client stream closed"))

    # --- background tasks ---------------------------------------------------

    async def _read_loop(self) -> None:
        call = self._call
        if call is None:
            return
        try:
            while True:
                batch = await call.read()
                if not isinstance(batch, Batch):  # grpc.aio.EOF
                    break
                self._route(batch, dead=bool(batch.dead))
        except grpc.RpcError as exc:
            failure = self._explain(exc)
            if failure.code == "INTERNAL":
                log.debug("session %s: stream failed as INTERNAL; asking why", self.session_id)
                failure = await self._diagnose(failure)
            self._fail(failure)
            return
        self._fail(
            errors.UnavailableError(
                "UNAVAILABLE",
                f"the queue manager ended the result stream of {self.session_id} (session closed?)",
            )
        )

    async def _diagnose(self, failure: errors.RpcError) -> errors.RpcError:
        """grpc reports a stream that the server ended while we were writing to it
        as INTERNAL, hiding the server's status (e.g. NOT_FOUND for an unknown
        session). Ask the server about the session to learn the real cause."""
        call = self._stub.ClientStreamDeadLetters(
            SessionInfo(id=self.session_id), metadata=self._metadata, timeout=DIAGNOSE_TIMEOUT_S
        )
        try:
            async for batch in call:
                # Reading drained these dead letters: keep them like the poller does.
                if self._keep_dead_letter is not None:
                    self._keep_dead_letter(batch)
        except grpc.RpcError as exc:
            return self._explain(exc)
        return failure

    async def _poll_dead_letters(self) -> None:
        request = SessionInfo(id=self.session_id)
        while self._pending:
            await asyncio.sleep(self._poll_s)  # poll interval, only while tasks are outstanding
            call = self._stub.ClientStreamDeadLetters(request, metadata=self._metadata)
            # Read the call to its end, even when the last task is answered or the
            # result stream ends meanwhile (neither cancels it): the queue manager
            # hands each dead letter out once, so batches on their way would be lost.
            self._dead_letters_read.clear()
            try:
                while True:
                    batch = await call.read()
                    if not isinstance(batch, Batch):  # grpc.aio.EOF
                        break
                    if self._keep_dead_letter is not None:
                        self._keep_dead_letter(batch)
                    self._route(batch, dead=True)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self._fail(self._explain(exc))
                return
            finally:
                self._dead_letters_read.set()
                call.cancel()

    @property
    def _reading_dead_letters(self) -> bool:
        """The poller is inside a call: it is not cancelled then (what it reads is
        handed out once)."""
        return not self._dead_letters_read.is_set()

    # --- routing ------------------------------------------------------------

    async def dead_letters_settled(self, timeout_s: float = DIAGNOSE_TIMEOUT_S) -> None:
        """Return once no dead-letter read of the poller is under way (bounded): the
        batches it has taken off the queue manager are then all kept."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._dead_letters_read.wait(), timeout_s)

    def route_dead_letter(self, batch: Batch) -> None:
        """Answer the outstanding tasks of a dead-letter batch read elsewhere."""
        self._route(batch, dead=True)

    def _route(self, batch: Batch, dead: bool) -> None:
        pending = self._pending
        chunks: dict[Submission, list[TaskResult]] = {}
        batch_id = batch.id
        for m in batch.messages:
            key = m.related_id or m.id
            entry = pending.pop(key, None)
            if entry is None:
                if self.failure is None:
                    self.ignored += 1
                else:
                    self.late += 1
                continue
            sub, index = entry
            probe = self._probe
            if probe is not None and key in probe.ids:
                self._settle(probe, taken=True)  # it arrived: batches this large are taken
            error = m.error
            if dead:
                result = TaskResult(key, index, None, error or DEAD_LETTER_ERROR, True, batch_id)
            elif error is not None:
                result = TaskResult(key, index, None, error, False, batch_id)
            else:
                result = TaskResult(key, index, m.payload, None, False, batch_id)
            chunk = chunks.get(sub)
            if chunk is None:
                chunks[sub] = [result]
            else:
                chunk.append(result)
        for sub, chunk in chunks.items():
            sub.deliver(chunk)
        self._stop_poller_if_idle()

    def _stop_poller_if_idle(self) -> None:
        poller = self._poller
        # A poller inside a call ends after it (what it reads is handed out once).
        if poller is None or poller is asyncio.current_task() or self._reading_dead_letters:
            return
        if not self._pending:
            poller.cancel()

    def _broken(self, exc: BaseException) -> errors.AlpcrunError:
        if isinstance(exc, grpc.RpcError):
            return self._explain(exc)
        return errors.UnavailableError("UNAVAILABLE", f"client stream broken: {exc!r}")

    def _fail(self, exc: errors.AlpcrunError) -> None:
        if self.failure is None:
            self.failure = exc
        if self._pending:
            log.debug(
                "session %s: %d tasks unanswered: %s", self.session_id, len(self._pending), exc
            )
        self._pending.clear()
        for sub in self._subs:
            sub.fail(exc)
        current = asyncio.current_task()
        for task in (self._poller, *self._probe_calls):  # close() awaits what is left
            if task is self._poller and self._reading_dead_letters:
                continue  # it keeps what it reads (dead_letters()), then ends
            if task is not None and task is not current:
                task.cancel()

    async def _settle_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), timeout=DIAGNOSE_TIMEOUT_S + 1.0)
