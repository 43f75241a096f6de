"""One session's ``ClientStream`` and the routing of answers back to submissions.

A session has at most one open ``ClientStream``: the queue manager streams a
session's results to whichever client stream of that session is open, so
concurrent ``submit`` calls share one stream and answers are routed by task id
(``related_id``, falling back to ``id``). Dead letters do not come down the
stream; while tasks are outstanding ``ClientStreamDeadLetters`` is polled and
dead-lettered tasks count as answered. A task is answered at most once: its
entry leaves the routing table on the first answer, later ones are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.client.results import DEAD_LETTER_ERROR, Submission, TaskResult
from ray_alpcrun.rpc import QueueStub
from ray_alpcrun.transport import Metadata, translate
from ray_alpcrun.types import Batch, SessionInfo

log = logging.getLogger(__name__)

DIAGNOSE_TIMEOUT_S = 5.0


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

    async def close(self) -> None:
        """Half-close the stream and stop the background tasks; idempotent."""
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()
            call.cancel()
        for task in (self._reader, self._poller):
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
            try:
                while self._pending:
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
                call.cancel()

    # --- routing ------------------------------------------------------------

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
                self.ignored += 1
                continue
            sub, index = entry
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
        if not self._pending and poller is not None and poller is not asyncio.current_task():
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
        poller = self._poller
        if poller is not None and poller is not asyncio.current_task():
            poller.cancel()

    async def _settle_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), timeout=DIAGNOSE_TIMEOUT_S + 1.0)
