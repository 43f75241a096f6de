"""What a session needs from its client, as a protocol (httpcore's
``_async/interfaces.py`` is the model): ``session`` depends on this, ``aio``
implements it, and neither imports the other's module for it."""

from __future__ import annotations

from typing import Protocol, TypeVar

import grpc

from ray_alpcrun import errors
from ray_alpcrun.rpc import CacheStub, QueueStub, UnaryUnaryMethod
from ray_alpcrun.transport import Metadata

Req = TypeVar("Req")
Rep = TypeVar("Rep")


class SessionHost(Protocol):
    """The client side of an ``AsyncSession``: channels, settings, error mapping."""

    @property
    def api_key(self) -> str | None: ...
    @property
    def central_cache_address(self) -> str: ...
    @property
    def metadata(self) -> Metadata: ...
    @property
    def rpc_timeout_s(self) -> float | None: ...
    @property
    def dead_letter_poll_s(self) -> float: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def max_batch_bytes(self) -> int: ...
    @property
    def queue_max_message_bytes(self) -> int:
        """What the queue manager takes as far as known: ``max_message_bytes``, or
        the lower limit it named when it refused a batch."""
        ...

    @property
    def queue_refused_above(self) -> int | None:
        """The limit the queue manager named when it refused a batch; None before."""
        ...

    def queue_refused(self, max_message_bytes: int) -> None:
        """The queue manager refused a batch over ``max_message_bytes``."""
        ...

    async def queue_stub(self) -> QueueStub:
        """The queue manager's stub (its channel opened on first use)."""
        ...

    async def cache_stub(self) -> CacheStub:
        """The central cache's stub (its channel opened on first use)."""
        ...

    async def call(
        self, rpc: UnaryUnaryMethod[Req, Rep], request: Req, *, address: str | None = None
    ) -> Rep:
        """One unary RPC with the API key, the RPC timeout and error mapping."""
        ...

    def explain(self, exc: grpc.RpcError) -> errors.RpcError:
        """The project's error for a failed call to the queue manager."""
        ...

    def forget(self, session: object) -> None:
        """The session closed: the client no longer disconnects it on close."""
        ...
