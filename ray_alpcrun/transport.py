"""gRPC plumbing shared by every client and server here: method paths with a
configurable proto package, channels (plain or TLS), metadata, and the
translation of gRPC failures into the project's errors. Never imports Ray.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.wire import CODECS, DEFAULT_PROTO_PACKAGE, METHODS, MethodSpec

# Metadata keys (ALPCRUN_PROTOCOL.md 5.3). gRPC requires lower case.
MD_API_KEY = "api_key"
MD_NODE = "node"
MD_POD = "pod"
MD_SESSION_ID = "sessionid"
MD_WORKER_ID = "workerid"

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Metadata = tuple[tuple[str, str], ...]
# grpc's stubs make these generic; the project's code does not need the parameters.
Context = Any


def method_path(package: str, service: str, method: str) -> str:
    """``/ghpc.v1.Queue/WorkerUpdate``; an empty package gives ``/Queue/WorkerUpdate``."""
    return f"/{service_name(package, service)}/{method}"


def service_name(package: str, service: str) -> str:
    return f"{package}.{service}" if package else service


def make_metadata(api_key: str | None, **extra: str) -> Metadata:
    pairs = [(MD_API_KEY, api_key)] if api_key else []
    pairs.extend((k, v) for k, v in extra.items() if v)
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for TLS. A client needs ``ca_cert``; mutual TLS adds cert + key.
    A server needs cert + key; with ``ca_cert`` it also requires client certificates."""

    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def _read(self, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise errors.ConfigError(f"cannot read TLS file {path}: {exc.strerror}") from exc

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca_cert),
            private_key=self._read(self.key),
            certificate_chain=self._read(self.cert),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key = self._read(self.cert), self._read(self.key)
        if cert is None or key is None:
            raise errors.ConfigError("a TLS server needs both a certificate and a key file")
        ca = self._read(self.ca_cert)
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Client channel options. Keepalive pings only while calls are open, and no
    more often than gRPC servers accept by default (5 minutes): more frequent
    pings earn a GOAWAY "too_many_pings" that breaks every stream."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Server options: message limits, and tolerance for clients that ping every
    10 s or more (long-lived worker streams behind NATs and load balancers)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def open_channel(
    address: str,
    tls: TlsFiles | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """An asyncio channel; call from inside the event loop that will use it."""
    options = channel_options(max_message_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)


def open_sync_channel(
    address: str,
    tls: TlsFiles | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A blocking channel, for the plain reference worker and synchronous clients."""
    options = channel_options(max_message_bytes)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.channel_credentials(), options=options)


# --- client side -----------------------------------------------------------


class Stub:
    """Callables for one service, e.g. ``Stub(ch, "Queue").CreateSession(session)``.

    Works on sync and asyncio channels alike; requests and replies are
    ``ray_alpcrun.types`` objects.
    """

    def __init__(self, channel: Any, service: str, package: str = DEFAULT_PROTO_PACKAGE) -> None:
        self._calls: dict[str, Any] = {}
        for spec in METHODS.values():
            if spec.service != service:
                continue
            factory = getattr(channel, spec.cardinality)
            self._calls[spec.name] = factory(
                method_path(package, service, spec.name),
                request_serializer=CODECS[spec.request].encode,
                response_deserializer=CODECS[spec.response].decode,
            )
        if not self._calls:
            raise ValueError(f"no such service in the contract: {service}")

    def __getattr__(self, name: str) -> Any:
        try:
            return self._calls[name]
        except KeyError:
            raise AttributeError(name) from None


_AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE}


def translate(exc: grpc.RpcError) -> errors.RpcError:
    """Map a gRPC failure to the project's error for it (who must act)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code in _AUTH_CODES:
        return errors.AuthError(name, details)
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFoundError(name, details)
    if code in _UNAVAILABLE_CODES:
        return errors.UnavailableError(name, details)
    return errors.RpcError(name, details)


@contextlib.contextmanager
def rpc_errors(
    explain: Callable[[grpc.RpcError], errors.RpcError] = translate,
) -> Iterator[None]:
    """The one boundary where gRPC failures become the project's errors: a
    ``grpc.RpcError`` raised inside the block is re-raised as ``explain(exc)``
    (chained), like httpcore's ``map_exceptions``::

        with rpc_errors():
            reply = await stub.CreateSession(session, metadata=md)
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise explain(exc) from exc


# --- server side -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request that did not parse; servers answer INVALID_ARGUMENT."""

    reason: str


def _lenient(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return decode(data)
        except errors.ProtocolError as exc:
            return Malformed(str(exc))

    return run


async def _checked_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.reason)
        yield item


def _wrap(spec: MethodSpec, fn: Callable[..., Any]) -> Callable[..., Any]:
    # grpc.aio picks the calling convention by inspecting the handler, so the
    # wrappers must be async generator functions where ``fn`` is one.
    streams_out = spec.cardinality in ("stream_stream", "unary_stream")
    if streams_out and not inspect.isasyncgenfunction(fn):
        raise TypeError(f"{spec.name} must be an async generator function")

    if spec.cardinality == "stream_stream":

        async def stream_handler(
            requests: AsyncIterator[Any], context: Context
        ) -> AsyncIterator[Any]:
            async for item in fn(_checked_stream(requests, context), context):
                yield item

        return stream_handler

    if spec.cardinality == "unary_stream":

        async def unary_stream_handler(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for item in fn(request, context):
                yield item

        return unary_stream_handler

    async def unary_handler(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await fn(request, context)

    return unary_handler


def service_handler(service: str, impl: object, package: str = DEFAULT_PROTO_PACKAGE) -> Any:
    """A grpc.aio handler serving ``service`` from ``impl``'s methods named as the RPCs
    (``async def CreateSession(self, request, context)``, async generators for
    server streams). Malformed requests are answered INVALID_ARGUMENT before
    ``impl`` sees them."""
    handlers: dict[str, Any] = {}
    for spec in METHODS.values():
        if spec.service != service:
            continue
        fn = _wrap(spec, getattr(impl, spec.name))
        make = getattr(grpc, f"{spec.cardinality}_rpc_method_handler")
        handlers[spec.name] = make(
            fn,
            request_deserializer=_lenient(CODECS[spec.request].decode),
            response_serializer=CODECS[spec.response].encode,
        )
    return grpc.method_handlers_generic_handler(service_name(package, service), handlers)


def services_named(names: Sequence[str], package: str) -> list[str]:
    return [service_name(package, n) for n in names]
