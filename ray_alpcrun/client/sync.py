"""The blocking client: a facade that runs :class:`AsyncClient` on a private
event loop in a background thread.

Because the loop is private, the same code works in scripts and inside
Jupyter (where a loop is already running in the calling thread)::

    with Client(queue="127.0.0.1:1337", central_cache="127.0.0.1:2337") as client:
        with client.create_session(app_id="demo") as session:
            results = session.run([b"a", b"b"], batch_size=100)
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ray_alpcrun.client.aio import AsyncClient
from ray_alpcrun.client.results import TaskResult
from ray_alpcrun.client.session import (
    DEFAULT_SHARED_TTL_S,
    AsyncSession,
    SessionChanges,
    SubmitKwargs,
    SubmitOptions,
    close_after,
)
from ray_alpcrun.loop_thread import LoopThread
from ray_alpcrun.transport import DEFAULT_MAX_MESSAGE_BYTES, TlsFiles
from ray_alpcrun.types import Batch, SessionAttributes
from ray_alpcrun.wire import DEFAULT_PROTO_PACKAGE

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

T = TypeVar("T")

_DONE = object()
GRPC_SETTLE_S = 0.05


class Client:
    """Blocking client of the ALPCRUN.CH queue manager and central cache.

    Takes the same arguments as :class:`AsyncClient`; connects on construction
    (waits up to ``connect_timeout_s`` for the queue manager).
    """

    def __init__(
        self,
        queue: str | None = None,
        central_cache: str | None = None,
        api_key: str | None = None,
        proto_package: str = DEFAULT_PROTO_PACKAGE,
        tls: TlsFiles | str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        connect_timeout_s: float = 10.0,
        rpc_timeout_s: float | None = 30.0,
        dead_letter_poll_s: float = 0.25,
    ) -> None:
        self._loop = LoopThread("alpcrun-client-loop", "the blocking Client")
        try:
            self._async = AsyncClient(
                queue=queue,
                central_cache=central_cache,
                api_key=api_key,
                proto_package=proto_package,
                tls=tls,
                max_message_bytes=max_message_bytes,
                connect_timeout_s=connect_timeout_s,
                rpc_timeout_s=rpc_timeout_s,
                dead_letter_poll_s=dead_letter_poll_s,
            )
            self._loop.run(self._async.connect())
        except BaseException:
            self._loop.stop(GRPC_SETTLE_S)
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with close_after(e):
            self.close()

    @property
    def aio(self) -> AsyncClient:
        """The underlying async client (it lives on this client's private loop)."""
        return self._async

    @property
    def queue_address(self) -> str:
        return self._async.queue_address

    @property
    def central_cache_address(self) -> str:
        return self._async.central_cache_address

    def close(self) -> None:
        """Close streams and channels and stop the private loop; sessions stay open."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop(GRPC_SETTLE_S)

    def create_session(
        self,
        app_id: str,
        priority: int = 5,
        min_workers: int | None = None,
        max_workers: int | None = None,
        idle_timeout_s: float | None = None,
        preemptible: bool = False,
        cleanup_on_client_exit: bool = False,
        max_inflight_batches_per_worker: int | None = None,
        tags: Iterable[str] = (),
        client_id: str = "",
    ) -> Session:
        """Create a session (``CreateSession``); ``None`` leaves a setting to the server.

        ``with client.create_session(app_id="demo") as session:`` closes it on exit.
        """
        created = self._async.create_session(
            app_id,
            priority=priority,
            min_workers=min_workers,
            max_workers=max_workers,
            idle_timeout_s=idle_timeout_s,
            preemptible=preemptible,
            cleanup_on_client_exit=cleanup_on_client_exit,
            max_inflight_batches_per_worker=max_inflight_batches_per_worker,
            tags=tags,
            client_id=client_id,
        )
        return Session(self._loop, self._loop.run(created))

    def session(self, session_id: str, app_id: str = "") -> Session:
        """A handle on an existing session (see :meth:`AsyncClient.session`)."""
        return Session(self._loop, self._async.session(session_id, app_id))


class Session:
    """Blocking handle on a session; ``with session:`` closes it on exit."""

    def __init__(self, loop: LoopThread, session: AsyncSession) -> None:
        self._loop = loop
        self._async = session

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, app_id={self.app_id!r})"

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with close_after(e):
            self.close()

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def app_id(self) -> str:
        return self._async.app_id

    @property
    def attributes(self) -> SessionAttributes | None:
        return self._async.attributes

    @property
    def shared_level(self) -> int | None:
        return self._async.shared_level

    def update(self, **changes: Unpack[SessionChanges]) -> None:
        """See :meth:`AsyncSession.update`."""
        self._loop.run(self._async.update(**changes))

    def set_shared_data(
        self, payload: bytes, level: int | None = None, ttl_s: float | None = DEFAULT_SHARED_TTL_S
    ) -> int:
        """See :meth:`AsyncSession.set_shared_data`."""
        return self._loop.run(self._async.set_shared_data(payload, level=level, ttl_s=ttl_s))

    def submit(
        self, payloads: Iterable[bytes], **options: Unpack[SubmitKwargs]
    ) -> Iterator[TaskResult]:
        """Answers as they arrive (see :meth:`AsyncSession.submit`).

        Sending starts when iteration starts; ``payloads`` is consumed on the
        client's loop thread. Leaving the loop early abandons the rest.
        """
        for chunk in self._chunks(payloads, SubmitOptions(**options)):
            yield from chunk

    def run(self, payloads: Iterable[bytes], **options: Unpack[SubmitKwargs]) -> list[TaskResult]:
        """Every answer, in input order (see :meth:`AsyncSession.run`)."""
        return self._loop.run(self._async.run(payloads, **options))

    def map(self, payloads: Iterable[bytes], **options: Unpack[SubmitKwargs]) -> list[bytes]:
        """Result payloads in input order; raises ``TaskFailed`` for the first failed task."""
        return self._loop.run(self._async.map(payloads, **options))

    def dead_letters(self) -> list[Batch]:
        """See :meth:`AsyncSession.dead_letters`."""
        return self._loop.run(self._async.dead_letters())

    def disconnect(self) -> None:
        """Close this client's result stream; the session stays on the server."""
        self._loop.run(self._async.disconnect())

    def close(self) -> None:
        """Close the session (``CloseSession``); idempotent."""
        self._loop.run(self._async.close())

    def _chunks(
        self, payloads: Iterable[bytes], options: SubmitOptions
    ) -> Iterator[list[TaskResult]]:
        # Chunks cross threads through a plain queue: one hand-over per result
        # batch, not per task. The pump waits until the consumer took each chunk,
        # so answers not yet taken stay counted against ``max_pending_tasks``.
        q: queue.SimpleQueue[list[TaskResult] | object] = queue.SimpleQueue()
        taken = asyncio.Event()
        loop = self._loop.loop

        async def pump() -> None:
            async for chunk in self._async.results_in_chunks(payloads, options):
                taken.clear()
                q.put(chunk)
                await taken.wait()

        future = self._loop.submit(pump())
        future.add_done_callback(lambda _: q.put(_DONE))
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    future.result()  # re-raises the submission's failure
                    return
                loop.call_soon_threadsafe(taken.set)
                yield item  # type: ignore[misc]
        finally:
            if not future.done():
                future.cancel()
