"""A session as the client sees it: settings, shared data, streaming submission,
dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, TypedDict

from ray_alpcrun import errors
from ray_alpcrun.client.batching import chunks, pack, progress_bar
from ray_alpcrun.client.interfaces import SessionHost
from ray_alpcrun.client.limits import too_large, usable_bytes
from ray_alpcrun.client.results import Submission, TaskResult
from ray_alpcrun.client.stream import ClientStream
from ray_alpcrun.transport import MD_SESSION_ID, make_metadata, rpc_errors
from ray_alpcrun.types import Batch, Message, SessionAttributes, SessionInfo, SharedData
from ray_alpcrun.wire import batch_header_bytes

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

Payloads = Iterable[bytes] | AsyncIterable[bytes]

DEFAULT_BATCH_SIZE = 100
DEFAULT_MAX_PENDING_TASKS = 200_000
DEFAULT_SHARED_TTL_S = 600.0


@dataclasses.dataclass(frozen=True, slots=True)
class SubmitOptions:
    """How ``submit``/``run``/``map`` send a stream of payloads (one source for the
    async and blocking APIs, which take these as keyword arguments).

    ``batch_size`` is an upper bound: a batch is cut further so that it fits
    ``max_message_bytes`` as encoded, and so that its answers fit one message
    even when every task fails (about 4,500 tasks at the default 4 MiB; see
    ``client/batching.py``). ``use_shared_data=None`` means "if this session
    published shared data"; ``shared_level=None`` the latest level it published. At most
    ``max_pending_tasks`` tasks are held at a time, counting answers not yet
    taken by the consumer, so a slow consumer bounds the client's memory.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    use_shared_data: bool | None = None
    shared_level: int | None = None
    priority: int = 0
    progress: bool = False
    timeout_s: float | None = None
    max_pending_tasks: int = DEFAULT_MAX_PENDING_TASKS

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.priority < 0:
            raise ValueError("batch priority must be >= 0 (higher runs first)")
        if self.max_pending_tasks < 1:
            raise ValueError("max_pending_tasks must be at least 1")


class SessionChanges(TypedDict, total=False):
    """What ``update`` may change (the other attributes are fixed at creation)."""

    priority: int
    min_workers: int | None
    max_workers: int | None
    idle_timeout_s: float | None
    preemptible: bool
    cleanup_on_client_exit: bool
    max_inflight_batches_per_worker: int | None
    tags: Iterable[str]


class SubmitKwargs(TypedDict, total=False):
    """:class:`SubmitOptions` as keyword arguments (for typing ``**options``)."""

    batch_size: int
    use_shared_data: bool | None
    shared_level: int | None
    priority: int
    progress: bool
    timeout_s: float | None
    max_pending_tasks: int


def close_after(primary: BaseException | None) -> contextlib.AbstractContextManager[None]:
    """Run a close that must not hide ``primary`` (the exception leaving a ``with``
    block): if both fail, ``primary`` propagates with the close failure in a note."""
    return _CloseAfter(primary)


class _CloseAfter(contextlib.AbstractContextManager[None]):
    def __init__(self, primary: BaseException | None) -> None:
        self._primary = primary

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._primary is None or not isinstance(e, Exception):
            return False
        note = f"then closing failed too: {type(e).__name__}: {e}"
        add_note = getattr(self._primary, "add_note", None)  # Python 3.11+
        if add_note is not None:
            add_note(note)
        return True  # the caller's exception goes on, not this one


class AsyncSession:
    """A session on the queue manager: submit tasks, read answers, manage it.

    ``async with session:`` closes it on exit.
    """

    def __init__(self, client: SessionHost, session: SessionInfo) -> None:
        self._client = client
        self._session = session
        self.shared_level: int | None = None
        self._tag = secrets.token_hex(4) + "."
        self._next_task = 0
        self._next_batch = 0
        self._stream: ClientStream | None = None
        self._closed = False
        self._dead_letters: list[Batch] = []

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r}, app_id={self.app_id!r})"

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def app_id(self) -> str:
        return self._session.app_id

    @property
    def attributes(self) -> SessionAttributes | None:
        """As created or last updated by this client; ``None`` for an attached session."""
        return self._session.attributes

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with close_after(e):
            await self.close()

    async def update(self, **changes: Unpack[SessionChanges]) -> None:
        """Change attributes (``UpdateSession``), e.g. ``update(priority=8, max_workers=200)``.

        The full attribute set is sent: the current values with ``changes`` applied.
        """
        fields: dict[str, object] = dict(changes)
        if "priority" in changes:
            check_priority(changes["priority"])
        if "tags" in changes:
            fields["tags"] = tuple(changes["tags"])
        if fields.get("max_inflight_batches_per_worker", 0) is None:
            fields["max_inflight_batches_per_worker"] = 0
        current = self._session.attributes or SessionAttributes()
        attrs = dataclasses.replace(current, **fields)  # type: ignore[arg-type]  # checked above
        session = dataclasses.replace(self._session, attributes=attrs)
        queue = await self._client.queue_stub()
        await self._client.call(queue.UpdateSession, session)
        self._session = session

    async def set_shared_data(
        self, payload: bytes, level: int | None = None, ttl_s: float | None = DEFAULT_SHARED_TTL_S
    ) -> int:
        """Publish shared data to the central cache and return its update level.

        ``level=None`` takes the next level (1 for the first publication).
        Later ``submit``/``run`` calls use the latest level by default.
        """
        if level is None:
            level = (self.shared_level or 0) + 1
        if level < 0:
            raise ValueError("level must be >= 0")
        if len(payload) > self._client.max_batch_bytes:
            raise errors.PayloadTooLarge(
                too_large("shared data", len(payload), self._client.max_message_bytes)
            )
        data = SharedData(
            session_id=self.id, update_level=level, payload=bytes(payload), ttl_s=ttl_s
        )
        cache = await self._client.cache_stub()
        await self._client.call(
            cache.SetSharedData, data, address=self._client.central_cache_address
        )
        if self.shared_level is None or level > self.shared_level:
            self.shared_level = level
        return level

    def submit(
        self, payloads: Payloads, **options: Unpack[SubmitKwargs]
    ) -> AsyncIterator[TaskResult]:
        """Send ``payloads`` in batches and yield each task's answer as it arrives.

        Sending and receiving overlap, so ``payloads`` may be a lazy or huge
        (async) iterable. Options (:class:`SubmitOptions`): ``batch_size``,
        ``use_shared_data``, ``shared_level``, ``priority``, ``progress``,
        ``timeout_s``, ``max_pending_tasks``; ``batch_size`` is an upper bound
        (batches are also cut to fit the message limit). A payload larger than
        the client's message limit, or than the queue manager's once it refused
        one, fails that task only (its ``error`` names the limit).
        """
        return self._results(payloads, SubmitOptions(**options))

    async def _results(self, payloads: Payloads, opts: SubmitOptions) -> AsyncIterator[TaskResult]:
        async for chunk in self.results_in_chunks(payloads, opts):
            for result in chunk:
                yield result

    async def run(self, payloads: Payloads, **options: Unpack[SubmitKwargs]) -> list[TaskResult]:
        """Like :meth:`submit`, but returns every answer, in input order."""
        results: list[TaskResult] = []
        async for chunk in self.results_in_chunks(payloads, SubmitOptions(**options)):
            results.extend(chunk)
        results.sort(key=_index)
        return results

    async def map(self, payloads: Payloads, **options: Unpack[SubmitKwargs]) -> list[bytes]:
        """Result payloads in input order; raises ``TaskFailed`` for the first failed task."""
        return [r.value() for r in await self.run(payloads, **options)]

    def submit_chunks(
        self, payloads: Payloads, **options: Unpack[SubmitKwargs]
    ) -> AsyncIterator[list[TaskResult]]:
        """:meth:`submit`, yielding answers in the chunks they arrived in (less overhead)."""
        return self.results_in_chunks(payloads, SubmitOptions(**options))

    async def results_in_chunks(
        self, payloads: Payloads, opts: SubmitOptions
    ) -> AsyncIterator[list[TaskResult]]:
        """The one implementation behind every submit flavour, sync twins included."""
        use_shared_data = opts.use_shared_data
        if use_shared_data is None:
            use_shared_data = opts.shared_level is not None or self.shared_level is not None
        level = None
        if use_shared_data:
            level = opts.shared_level if opts.shared_level is not None else self.shared_level
        stream = await self._open_stream()
        sub = Submission(opts.max_pending_tasks)
        stream.attach(sub)
        loop = asyncio.get_running_loop()
        sender = loop.create_task(
            self._send_all(stream, sub, payloads, opts, use_shared_data, level),
            name=f"alpcrun-send-{self.id}",
        )
        sender.add_done_callback(lambda task: _report_failure(task, sub))
        bar = progress_bar(payloads) if opts.progress else None
        timeout_s = opts.timeout_s
        deadline = None if timeout_s is None else loop.time() + timeout_s
        try:
            while not sub.finished:
                if deadline is None:
                    item = await sub.items.get()
                else:
                    try:
                        item = await asyncio.wait_for(sub.items.get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        raise errors.SubmitTimeout(
                            f"session {self.id}: {sub.outstanding} of {sub.sent} tasks "
                            f"unanswered after {timeout_s:g} s"
                        ) from None
                if item is None:
                    continue
                if isinstance(item, BaseException):
                    raise item
                sub.took(len(item))
                if bar is not None:
                    bar.update(len(item))
                yield item
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
            stream.detach(sub)
            if bar is not None:
                bar.close()

    async def dead_letters(self) -> list[Batch]:
        """Dead-lettered batches of the session not returned by an earlier call.

        The queue manager hands each dead letter out once; batches this client
        drained while waiting for answers (their tasks were already reported
        with ``dead=True``) are kept and returned here too, oldest first.
        """
        if self._stream is not None:
            # The poller may be reading batches it took off the queue manager: the
            # queue manager hands each out once, so wait for them (issue 23's chaos
            # run lost 56 tasks of a closed session when this read came first).
            await self._stream.dead_letters_settled()
        stub = await self._client.queue_stub()
        call = stub.ClientStreamDeadLetters(
            SessionInfo(id=self.id),
            metadata=self._client.metadata,
            timeout=self._client.rpc_timeout_s,
        )
        fresh: list[Batch] = []
        try:
            with rpc_errors(self._client.explain):
                async for batch in call:
                    fresh.append(batch)
                    if self._stream is not None:
                        # A running submission may be waiting for exactly these tasks.
                        self._stream.route_dead_letter(batch)
        except errors.RpcError:
            self._dead_letters.extend(fresh)  # read once: keep them for the next call
            raise
        out, self._dead_letters = self._dead_letters + fresh, []
        return out

    def _dead_letters_append(self, batch: Batch) -> None:
        self._dead_letters.append(batch)

    async def disconnect(self) -> None:
        """Close this client's result stream; the session stays on the server."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    async def close(self) -> None:
        """Close the session (``CloseSession``); idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.disconnect()
        self._client.forget(self)
        queue = await self._client.queue_stub()
        await self._client.call(queue.CloseSession, SessionInfo(id=self.id))

    # --- internals ------------------------------------------------------------

    async def _open_stream(self) -> ClientStream:
        if self._closed:
            raise errors.AlpcrunError(f"session {self.id} is closed")
        stream = self._stream
        if stream is None or not stream.healthy:
            stub = await self._client.queue_stub()
            if self._stream is not None and self._stream.healthy:
                return self._stream  # another submit opened it meanwhile
            metadata = make_metadata(self._client.api_key, **{MD_SESSION_ID: self.id})
            stream = ClientStream(
                stub,
                self.id,
                metadata,
                self._client.dead_letter_poll_s,
                self._client.explain,
                self._dead_letters_append,
                max_message_bytes=self._client.max_message_bytes,
                queue_max_message_bytes=self._client.queue_refused_above,
                on_refused=self._client.queue_refused,
            )
            stream.open()
            self._stream = stream
        return stream

    async def _send_all(
        self,
        stream: ClientStream,
        sub: Submission,
        payloads: Payloads,
        opts: SubmitOptions,
        use_shared_data: bool,
        level: int | None,
    ) -> None:
        index = 0
        tag = self._tag
        use = True if use_shared_data else None
        async for chunk in chunks(payloads, opts.batch_size):
            first = self._next_task
            self._next_task += len(chunk)
            messages = [Message(f"{tag}{first + i}", p) for i, p in enumerate(chunk)]
            # Within what the queue manager takes as far as known (lower once it refused).
            limit = usable_bytes(self._client.queue_max_message_bytes)
            # Header of the longest batch id this chunk can take (ids only grow).
            header = batch_header_bytes(
                Batch(
                    id=f"{tag}b{self._next_batch + len(chunk)}",
                    session_id=self.id,
                    priority=opts.priority,
                    use_shared_data=use,
                    required_shared_data_update_level=level,
                )
            )
            for part in pack(messages, header, limit):
                await sub.wait_for_space()
                at = index + part.offset
                if not part.fits:
                    # gRPC would refuse the whole stream (RESOURCE_EXHAUSTED): fail this task only.
                    sub.sent += 1
                    error = too_large(
                        "task payload",
                        len(part.messages[0].payload),
                        self._client.max_message_bytes,
                        self._client.queue_max_message_bytes,
                    )
                    sub.deliver([TaskResult(part.messages[0].id, at, None, error, False, "")])
                    continue
                self._next_batch += 1
                batch = Batch(
                    id=f"{tag}b{self._next_batch}",
                    session_id=self.id,
                    priority=opts.priority,
                    messages=part.messages,
                    use_shared_data=use,
                    required_shared_data_update_level=level,
                )
                await stream.send(sub, batch, at)
            index += len(chunk)
        sub.mark_all_sent()


def _report_failure(task: asyncio.Task[None], sub: Submission) -> None:
    # The sender's failure (a bad payload, a broken stream) ends the submission.
    if not task.cancelled() and (exc := task.exception()) is not None:
        sub.fail(exc)


def _index(r: TaskResult) -> int:
    return r.index


def check_priority(priority: int) -> int:
    if not 0 <= priority <= 10:
        raise ValueError(f"priority must be within 0..10, got {priority}")
    return priority
