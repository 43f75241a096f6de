"""The two ALPCRUN.CH services as typed Python: client stubs (``QueueStub``,
``CacheStub``) and the handler protocols a server implements (``QueueHandler``,
``CacheHandler``), built from ``wire.METHODS``, the table that also picks each
RPC's codecs. Never imports Ray.

Every RPC is typed end to end, as grpclib's ``UnaryUnaryMethod`` /
``StreamStreamMethod`` are: ``QueueStub.CreateSession`` takes a ``SessionInfo`` and
its call awaits to a ``SessionInfo``. The declarations below are checked against
the table when this module is imported, so they cannot drift from the proto::

    queue = QueueStub(channel, package="ghpc.v1")
    session = await queue.CreateSession(SessionInfo(app_id="demo"), metadata=md)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar, overload

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.types import Batch, Instruction, SessionInfo, SharedData, Status, WorkerState
from ray_alpcrun.wire import CODECS, DEFAULT_PROTO_PACKAGE, METHODS, MethodSpec

Req = TypeVar("Req")
Rep = TypeVar("Rep")
CallMetadata = Sequence[tuple[str, str]]
# Stubs are typed for asyncio channels; on a blocking channel the calls block.
AnyChannel = grpc.aio.Channel | grpc.Channel


# One RPC of each shape, generic in request and reply: what grpc.aio's
# multi-callables do, as the project calls them (keyword metadata and timeout;
# a stream's requests may be written later with ``call.write``).
class UnaryUnaryMethod(Protocol[Req, Rep]):
    def __call__(
        self, request: Req, *, metadata: CallMetadata | None = None, timeout: float | None = None
    ) -> grpc.aio.UnaryUnaryCall[Req, Rep]: ...


class UnaryStreamMethod(Protocol[Req, Rep]):
    def __call__(
        self, request: Req, *, metadata: CallMetadata | None = None, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[Req, Rep]: ...


class StreamStreamMethod(Protocol[Req, Rep]):
    def __call__(
        self,
        requests: AsyncIterator[Req] | Iterator[Req] | None = None,
        *,
        metadata: CallMetadata | None = None,
        timeout: float | None = None,
    ) -> grpc.aio.StreamStreamCall[Req, Rep]: ...


# The servicer context; the project's handlers use only abort, metadata and peer.
Context = grpc.aio.ServicerContext[object, object]

_SHAPES = {
    "UnaryUnaryMethod": "unary_unary",
    "UnaryStreamMethod": "unary_stream",
    "StreamStreamMethod": "stream_stream",
}


def service_name(package: str, service: str) -> str:
    return f"{package}.{service}" if package else service


def method_path(package: str, service: str, method: str) -> str:
    """``/ghpc.v1.Queue/WorkerUpdate``; an empty package gives ``/Queue/WorkerUpdate``."""
    return f"/{service_name(package, service)}/{method}"


# --- client side -----------------------------------------------------------


class _ServiceStub:
    SERVICE = ""

    def __init__(self, channel: AnyChannel, package: str = DEFAULT_PROTO_PACKAGE) -> None:
        # Sync channels work too (tests, blocking tools): the calls then block.
        for spec in _specs(self.SERVICE):
            factory = getattr(channel, spec.cardinality)
            setattr(
                self,
                spec.name,
                factory(
                    method_path(package, self.SERVICE, spec.name),
                    request_serializer=CODECS[spec.request].encode,
                    response_deserializer=CODECS[spec.response].decode,
                ),
            )


class QueueStub(_ServiceStub):
    """The queue manager's RPCs (5.3), typed."""

    SERVICE = "Queue"
    CreateSession: UnaryUnaryMethod[SessionInfo, SessionInfo]
    UpdateSession: UnaryUnaryMethod[SessionInfo, Status]
    CloseSession: UnaryUnaryMethod[SessionInfo, Status]
    ClientStream: StreamStreamMethod[Batch, Batch]
    ClientStreamDeadLetters: UnaryStreamMethod[SessionInfo, Batch]
    WorkerStream: StreamStreamMethod[Batch, Batch]
    WorkerUpdate: StreamStreamMethod[WorkerState, Instruction]


class CacheStub(_ServiceStub):
    """The central and node caches' RPCs (5.3), typed."""

    SERVICE = "Cache"
    SetSharedData: UnaryUnaryMethod[SharedData, Status]
    GetSharedData: UnaryUnaryMethod[SharedData, SharedData]


@overload
def Stub(channel: AnyChannel, service: Literal["Queue"], package: str = ...) -> QueueStub: ...
@overload
def Stub(channel: AnyChannel, service: Literal["Cache"], package: str = ...) -> CacheStub: ...
def Stub(channel: AnyChannel, service: str, package: str = DEFAULT_PROTO_PACKAGE) -> _ServiceStub:
    """``QueueStub`` or ``CacheStub`` by service name, e.g. ``Stub(ch, "Queue")``."""
    for cls in (QueueStub, CacheStub):
        if service == cls.SERVICE:
            return cls(channel, package)
    raise ValueError(f"no such service in the contract: {service}")


# --- server side -----------------------------------------------------------


class QueueHandler(Protocol):
    """What a ``Queue`` server implements (the devserver's ``QueueServicer``)."""

    async def CreateSession(self, request: SessionInfo, context: Context) -> SessionInfo: ...
    async def UpdateSession(self, request: SessionInfo, context: Context) -> Status: ...
    async def CloseSession(self, request: SessionInfo, context: Context) -> Status: ...
    def ClientStream(
        self, requests: AsyncIterator[Batch], context: Context
    ) -> AsyncIterator[Batch]: ...
    def ClientStreamDeadLetters(
        self, request: SessionInfo, context: Context
    ) -> AsyncIterator[Batch]: ...
    def WorkerStream(
        self, requests: AsyncIterator[Batch], context: Context
    ) -> AsyncIterator[Batch]: ...
    def WorkerUpdate(
        self, requests: AsyncIterator[WorkerState], context: Context
    ) -> AsyncIterator[Instruction]: ...


class CacheHandler(Protocol):
    """What a ``Cache`` server implements (central and node cache)."""

    async def SetSharedData(self, request: SharedData, context: Context) -> Status: ...
    async def GetSharedData(self, request: SharedData, context: Context) -> SharedData: ...


class Malformed:
    """Stands in for a request that did not parse; servers answer INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(decode: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        try:
            return decode(data)
        except errors.ProtocolError as exc:
            return Malformed(str(exc))

    return run


async def _checked_stream(
    requests: AsyncIterator[object], context: Context
) -> AsyncIterator[object]:
    async for item in requests:
        if isinstance(item, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.reason)
        yield item


def _wrap(spec: MethodSpec, fn: Callable[..., Any]) -> Callable[..., object]:
    # grpc.aio picks the calling convention by inspecting the handler, so the
    # wrappers must be async generator functions where ``fn`` is one.
    streams_out = spec.cardinality in ("stream_stream", "unary_stream")
    if streams_out and not inspect.isasyncgenfunction(fn):
        raise TypeError(f"{spec.name} must be an async generator function")

    if spec.cardinality == "stream_stream":

        async def stream_handler(
            requests: AsyncIterator[object], context: Context
        ) -> AsyncIterator[object]:
            async for item in fn(_checked_stream(requests, context), context):
                yield item

        return stream_handler

    if spec.cardinality == "unary_stream":

        async def unary_stream_handler(request: object, context: Context) -> AsyncIterator[object]:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for item in fn(request, context):
                yield item

        return unary_stream_handler

    async def unary_handler(request: object, context: Context) -> object:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        reply: Awaitable[object] = fn(request, context)
        return await reply

    return unary_handler


@overload
def service_handler(
    service: Literal["Queue"], impl: QueueHandler, package: str = ...
) -> grpc.GenericRpcHandler[object, object]: ...
@overload
def service_handler(
    service: Literal["Cache"], impl: CacheHandler, package: str = ...
) -> grpc.GenericRpcHandler[object, object]: ...
def service_handler(
    service: str, impl: object, package: str = DEFAULT_PROTO_PACKAGE
) -> grpc.GenericRpcHandler[object, object]:
    """A grpc.aio handler serving ``service`` from ``impl``'s methods named as the RPCs
    (``async def CreateSession(self, request, context)``, async generators for
    server streams). Malformed requests are answered INVALID_ARGUMENT before
    ``impl`` sees them."""
    handlers: dict[str, grpc.RpcMethodHandler[object, object]] = {}
    for spec in _specs(service):
        fn = _wrap(spec, getattr(impl, spec.name))
        make = getattr(grpc, f"{spec.cardinality}_rpc_method_handler")
        handlers[spec.name] = make(
            fn,
            request_deserializer=_lenient(CODECS[spec.request].decode),
            response_serializer=CODECS[spec.response].encode,
        )
    return grpc.method_handlers_generic_handler(service_name(package, service), handlers)


def _specs(service: str) -> list[MethodSpec]:
    specs = [spec for spec in METHODS.values() if spec.service == service]
    if not specs:
        raise ValueError(f"no such service in the contract: {service}")
    return specs


def declared(cls: type[_ServiceStub]) -> dict[str, tuple[str, str, str]]:
    """(shape, request, reply) of each RPC as ``cls`` declares it."""
    out = {}
    for name, text in cls.__annotations__.items():
        found = re.fullmatch(r"(\w+)\[(\w+), (\w+)\]", str(text))
        if found and found.group(1) in _SHAPES:
            out[name] = (_SHAPES[found.group(1)], found.group(2), found.group(3))
    return out


def _check_against_the_table() -> None:
    for cls in (QueueStub, CacheStub):
        table = {
            s.name: (s.cardinality, s.request.__name__, s.response.__name__)
            for s in _specs(cls.SERVICE)
        }
        if declared(cls) != table:
            raise AssertionError(f"{cls.__name__} does not match the proto: {table}")
    for handler, service in ((QueueHandler, "Queue"), (CacheHandler, "Cache")):
        names = {n for n in vars(handler) if n[:1].isupper()}
        if names != {s.name for s in _specs(service)}:
            raise AssertionError(f"{handler.__name__} does not match the proto")


_check_against_the_table()
