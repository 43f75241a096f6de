"""The asyncio client: connections, unary calls, sessions.

Example::

    async with AsyncClient(queue="127.0.0.1:1337", central_cache="127.0.0.1:2337") as client:
        session = await client.create_session(app_id="demo")
        await session.set_shared_data(table_bytes)
        async for r in session.submit(payloads, batch_size=100):
            print(r.index, r.value())
        await session.close()
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.client.limits import usable_bytes
from ray_alpcrun.client.session import AsyncSession, check_priority, close_after
from ray_alpcrun.config import (
    DEFAULT_CENTRAL_CACHE_ADDR,
    DEFAULT_QUEUE_ADDR,
    Env,
    check_address,
)
from ray_alpcrun.rpc import CacheStub, QueueStub, UnaryUnaryMethod
from ray_alpcrun.transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Metadata,
    TlsFiles,
    make_metadata,
    open_channel,
    rpc_errors,
    translate,
)
from ray_alpcrun.types import SessionAttributes, SessionInfo
from ray_alpcrun.wire import DEFAULT_PROTO_PACKAGE

Req = TypeVar("Req")
Rep = TypeVar("Rep")


def explain(exc: grpc.RpcError, address: str, api_key: str | None) -> errors.RpcError:
    """Translate a gRPC failure, saying plainly what is wrong with an API key."""
    err = translate(exc)
    if isinstance(err, errors.AuthError):
        problem = (
            "no API key was sent"
            if api_key is None
            else "the API key was rejected (it differs from the service's)"
        )
        return errors.AuthError(
            err.code,
            f"{address}: {problem}; pass api_key= or set METALCORE_API_KEY ({err.details})",
        )
    return err


class AsyncClient:
    """Client of the ALPCRUN.CH queue manager and central cache (asyncio).

    Addresses and the API key default to ``METALCORE_QUEUE_MANAGER_ADDR``,
    ``METALCORE_CENTRAL_CACHE_ADDR`` and ``METALCORE_API_KEY``. Create it
    anywhere; channels open in :meth:`connect` (or ``async with``), inside the
    event loop that uses them.
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
        env = Env.read()
        self.queue_address = check_address(
            queue or env.queue_addr or DEFAULT_QUEUE_ADDR, "queue address"
        )
        self.central_cache_address = check_address(
            central_cache or env.central_cache_addr or DEFAULT_CENTRAL_CACHE_ADDR,
            "central cache address",
        )
        self.api_key = api_key if api_key is not None else env.api_key
        self.proto_package = proto_package
        self.tls = TlsFiles(ca_cert=tls) if isinstance(tls, str) else tls
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        # Leave headroom under the gRPC message limit for what the services add.
        self.max_batch_bytes = usable_bytes(max_message_bytes)
        # Set when the queue manager refused a batch (its limit is below ours).
        self.queue_refused_above: int | None = None
        self.connect_timeout_s = connect_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.dead_letter_poll_s = dead_letter_poll_s
        self.metadata: Metadata = make_metadata(self.api_key)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._queue: QueueStub | None = None
        self._cache: CacheStub | None = None
        self._sessions: set[AsyncSession] = set()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with close_after(e):
            await self.close()

    async def connect(self) -> AsyncClient:
        """Open the queue channel and wait until it is ready (``connect_timeout_s``)."""
        await self.queue_stub()
        return self

    async def close(self) -> None:
        """Close result streams and channels; sessions stay open on the server."""
        for session in list(self._sessions):
            await session.disconnect()
        channels, self._channels = self._channels, {}
        self._queue = self._cache = None
        for channel in channels.values():
            await channel.close(None)

    async def create_session(
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
    ) -> AsyncSession:
        """Create a session (``CreateSession``); ``None`` leaves a setting to the server."""
        if not app_id:
            raise ValueError("app_id is required")
        attrs = SessionAttributes(
            priority=check_priority(priority),
            client_id=client_id,
            min_workers=min_workers,
            max_workers=max_workers,
            idle_timeout_s=idle_timeout_s,
            preemptible=preemptible,
            cleanup_on_client_exit=cleanup_on_client_exit,
            max_inflight_batches_per_worker=max_inflight_batches_per_worker or 0,
            tags=tuple(tags),
        )
        queue = await self.queue_stub()
        reply = await self.call(queue.CreateSession, SessionInfo(app_id=app_id, attributes=attrs))
        if not reply.id:
            raise errors.ProtocolError("CreateSession answered without a session id")
        if reply.attributes is None:
            reply = dataclasses.replace(reply, attributes=attrs)
        return self._adopt(AsyncSession(self, reply))

    def session(self, session_id: str, app_id: str = "") -> AsyncSession:
        """A handle on an existing session (made by this or another client).

        Its attributes are unknown here, so ``update`` sends defaults for
        every setting it is not given.
        """
        if not session_id:
            raise ValueError("session_id is required")
        return self._adopt(AsyncSession(self, SessionInfo(id=session_id, app_id=app_id)))

    # --- SessionHost (client/interfaces.py): what AsyncSession uses -----------

    async def call(
        self, rpc: UnaryUnaryMethod[Req, Rep], request: Req, *, address: str | None = None
    ) -> Rep:
        """One unary RPC with the API key, the RPC timeout and error translation."""
        where = address or self.queue_address
        with rpc_errors(lambda exc: explain(exc, where, self.api_key)):
            return await rpc(request, metadata=self.metadata, timeout=self.rpc_timeout_s)

    async def queue_stub(self) -> QueueStub:
        if self._queue is None:
            self._queue = QueueStub(await self._channel(self.queue_address), self.proto_package)
        return self._queue

    async def cache_stub(self) -> CacheStub:
        if self._cache is None:
            channel = await self._channel(self.central_cache_address)
            self._cache = CacheStub(channel, self.proto_package)
        return self._cache

    def explain(self, exc: grpc.RpcError) -> errors.RpcError:
        return explain(exc, self.queue_address, self.api_key)

    @property
    def queue_max_message_bytes(self) -> int:
        refused = self.queue_refused_above
        return self.max_message_bytes if refused is None else min(refused, self.max_message_bytes)

    def queue_refused(self, max_message_bytes: int) -> None:
        if self.queue_refused_above is None or max_message_bytes < self.queue_refused_above:
            self.queue_refused_above = max_message_bytes

    def forget(self, session: object) -> None:
        if isinstance(session, AsyncSession):
            self._sessions.discard(session)

    def _adopt(self, session: AsyncSession) -> AsyncSession:
        self._sessions.add(session)
        return session

    async def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        return channel if channel is not None else await self._open(address)

    async def _open(self, address: str) -> grpc.aio.Channel:
        channel = open_channel(address, self.tls, self.max_message_bytes)
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout_s)
        except asyncio.TimeoutError:
            await channel.close(None)
            raise errors.UnavailableError(
                "UNAVAILABLE", f"cannot reach {address} within {self.connect_timeout_s:g} s"
            ) from None
        # Two concurrent openers: keep the first channel, close ours.
        existing = self._channels.setdefault(address, channel)
        if existing is not channel:
            await channel.close(None)
        return existing
