"""One bound session on one logical worker: its ``WorkerStream``.

Batches are processed concurrently (the queue manager's window bounds how many
are in flight); results go back on the stream the batch came from, never on
another. If the stream breaks, results that can no longer be sent are dropped:
the queue manager re-delivers those batches. Their computation goes on and is
kept a while (:mod:`ray_alpcrun.bridge.answerbook`): a delivery of the same batch
to this bridge again is answered from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.answers import dead_batches, result_batches
from ray_alpcrun.bridge.answerbook import AnswerBook, Key, batch_key
from ray_alpcrun.bridge.stats import BridgeStats
from ray_alpcrun.errors import PoolUnavailable, SessionSetupError
from ray_alpcrun.logs import fields
from ray_alpcrun.rpc import QueueStub
from ray_alpcrun.runtime import Outcome, describe
from ray_alpcrun.shared_data import SharedDataCache
from ray_alpcrun.transport import MD_POD, MD_SESSION_ID, MD_WORKER_ID, Metadata
from ray_alpcrun.types import Batch

log = logging.getLogger(__name__)

# How long a half-closed stream waits for the queue manager to end it.
_CLOSE_WAIT_S = 5.0


class Processor(Protocol):
    """The compute side of the bridge (on Ray: the actor pool)."""

    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        """Make shared data available to the compute side once; return a handle."""

    async def process(
        self, session_id: str, payloads: list[bytes], shared: Any | None
    ) -> list[Outcome]:
        """One outcome per payload; raise SessionSetupError if nothing can run, and
        PoolUnavailable while there is nothing to run it on (answered dead)."""

    async def end_session(self, session_id: str) -> None:
        """Release the session's state everywhere."""


@dataclass
class Link:
    """What a session stream needs from its worker."""

    queue: QueueStub
    metadata: Metadata
    shared: SharedDataCache
    processor: Processor
    stats: BridgeStats
    max_message_bytes: int
    # Set while nothing on this side can finish a batch (a node bridge whose node
    # has had no live actor for a while): a drain then stops waiting for what it
    # holds and leaves it to the queue manager, which re-delivers it elsewhere.
    give_back: asyncio.Event = field(default_factory=asyncio.Event)
    # Computations of batches whose answer was not sent yet, shared by every
    # delivery of the same batch to this worker's streams.
    answers: AnswerBook = field(default_factory=AnswerBook)


class WorkerStream:
    """One call of the queue manager's ``WorkerStream`` RPC, bound to one session."""

    def __init__(self, link: Link, session_id: str, worker_id: str, pod: str) -> None:
        self.link = link
        self.pod = pod
        self.session_id = session_id
        self.worker_id = worker_id
        self._call: grpc.aio.StreamStreamCall[Batch, Batch] | None = None
        self._write_lock = asyncio.Lock()
        self._batches: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.draining = False
        self.refused = 0  # batches that arrived while draining, left unanswered

    @property
    def in_flight(self) -> int:
        return len(self._batches)

    def start(self) -> None:
        metadata = (
            *self.link.metadata,
            (MD_POD, self.pod),
            (MD_SESSION_ID, self.session_id),
            (MD_WORKER_ID, self.worker_id),
        )
        self._call = self.link.queue.WorkerStream(metadata=metadata)
        self._reader = asyncio.create_task(self._read(), name=f"stream-{self.session_id}")

    async def _read(self) -> None:
        call = self._call
        assert call is not None  # start() opened it before starting this reader
        try:
            while True:
                batch = await call.read()
                if batch is grpc.aio.EOF:  # type: ignore[attr-defined]
                    log.info("session stream ended by the queue manager", extra=self._f())
                    break
                if not isinstance(batch, Batch):
                    # grpc hands over None for a frame its deserializer rejected. Its id
                    # is unknown, so it cannot be answered: count it, keep the stream;
                    # the queue manager's own timeout re-delivers or dead-letters it.
                    self.link.stats.batches_undecodable += 1
                    log.error("undecodable task batch skipped", extra=self._f())
                    continue
                if self.draining:
                    # Stopping: a batch that arrives now is not started. The queue
                    # manager re-delivers it when this stream closes unanswered.
                    self.refused += 1
                    continue
                task = asyncio.create_task(self._handle(batch))
                self._batches.add(task)
                self._idle.clear()
                task.add_done_callback(self._batch_done)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.warning(
                    "session stream broke",
                    extra=self._f(code=exc.code().name, details=exc.details()),
                )
        finally:
            self.closed.set()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if not self._batches:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("batch handler crashed", exc_info=task.exception(), extra=self._f())

    async def _handle(self, batch: Batch) -> None:
        stats = self.link.stats
        stats.batches_in_flight += 1
        started = time.perf_counter()
        key = batch_key(self.session_id, batch)
        try:
            answer = await self._answer(batch, key)
        except asyncio.CancelledError:
            self.link.answers.orphaned(key)  # the stream ended: delivered again, maybe elsewhere
            raise
        finally:
            stats.batches_in_flight -= 1
        elapsed = time.perf_counter() - started
        if answer[0].dead:
            stats.batches_dead += 1
            stats.tasks_dead += len(batch.messages)
        failed = sum(1 for part in answer for m in part.messages if m.error is not None)
        stats.tasks_failed += failed
        stats.tasks_ok += len(batch.messages) - failed
        stats.batches_done += 1
        stats.latency.observe(elapsed)
        sent = [await self._send(part) for part in answer]  # one unless it did not fit
        if all(sent):
            self.link.answers.sent(key)
        else:
            self.link.answers.orphaned(key)
        log.debug(
            "batch answered",
            extra=self._f(
                batch=batch.id, tasks=len(batch.messages), failed=failed, ms=elapsed * 1e3
            ),
        )

    async def _answer(self, batch: Batch, key: Key) -> list[Batch]:
        limit = self.link.max_message_bytes
        if batch.session_id and batch.session_id != self.session_id:
            return dead_batches(
                batch,
                f"batch for session {batch.session_id} arrived on {self.session_id}'s stream",
                limit,
            )
        try:
            work, again = self.link.answers.work(key, lambda: self._compute(batch))
            if again:
                self.link.stats.batches_answered_again += 1
                log.info("batch delivered again: its computation kept here answers it",
                         extra=self._f(batch=batch.id, done=work.done()))  # fmt: skip
            # Shielded: a stream that ends now leaves the computation to the next delivery.
            outcomes = await asyncio.shield(work)
        except (errors.SharedDataUnavailable, SessionSetupError, PoolUnavailable) as exc:
            log.warning("batch cannot run", extra=self._f(batch=batch.id, error=str(exc)))
            return dead_batches(batch, str(exc), limit)
        except Exception as exc:
            log.exception("processing failed", extra=self._f(batch=batch.id))
            return dead_batches(
                batch, f"bridge failed to process the batch: {describe(exc)}", limit
            )
        return result_batches(batch, outcomes, limit)

    async def _compute(self, batch: Batch) -> list[Outcome]:
        shared = None
        if batch.use_shared_data:
            shared = await self.link.shared.get(
                self.session_id, batch.required_shared_data_update_level
            )
        return await self.link.processor.process(
            self.session_id, [m.payload for m in batch.messages], shared
        )

    async def _send(self, answer: Batch) -> bool:
        call = self._call
        if self.closed.is_set() or call is None:
            self.link.stats.results_dropped += 1
            log.info("stream gone; result dropped", extra=self._f(batch=answer.id))
            return False
        try:
            async with self._write_lock:
                await call.write(answer)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            self.link.stats.results_dropped += 1
            log.info("result dropped: stream closed", extra=self._f(batch=answer.id, error=exc))
            return False
        return True

    async def drain(self, timeout_s: float | None) -> bool:
        """Finish the batches in flight, half-close and wait for the end of the stream.

        Batches that arrive from now on are not started (``refused`` counts them):
        left unanswered, they go back to the queue manager when the stream closes.
        Returns False if the deadline passed first, or nothing here could finish
        what is in flight (``Link.give_back``): the rest is then cancelled and the
        queue manager re-delivers it.
        """
        self.draining = True
        # A stream that ended meanwhile cannot carry results: stop waiting for them.
        waits = (self._idle, self.closed, self.link.give_back)
        ended = [asyncio.ensure_future(event.wait()) for event in waits]
        try:
            await asyncio.wait(ended, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in ended:
                waiting.cancel()
        finished = self._idle.is_set()
        if not finished and not self.closed.is_set():
            if self.link.give_back.is_set():
                text = "drain: nothing here can run what is in flight; given back"
            else:
                text = "drain deadline passed"
            log.warning(text, extra=self._f(in_flight=self.in_flight))
        if self._call is not None and not self.closed.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                async with self._write_lock:
                    await self._call.done_writing()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closed.wait(), _CLOSE_WAIT_S)
        await self.abort()
        log.info("session drained", extra=self._f(finished=finished, not_started=self.refused))
        return finished

    async def abort(self) -> None:
        """Stop at once: cancel the stream and the batches in flight."""
        if self._call is not None:
            self._call.cancel()
        tasks = [*self._batches, *([self._reader] if self._reader else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.closed.set()

    def _f(self, **extra: object) -> dict[str, object]:
        return fields(worker=self.worker_id, session=self.session_id, **extra)
