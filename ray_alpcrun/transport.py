"""gRPC plumbing shared by every client and server here: channels (plain or
TLS), metadata, and the one boundary where gRPC failures become the project's
errors (``rpc_errors``). The typed stubs and handler tables are in ``rpc``.
Never imports Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import grpc.aio

from ray_alpcrun import errors

# The typed stubs and the service table live in ``rpc``; these names stay here
# for the call sites written against ``transport.Stub`` and friends.
from ray_alpcrun.rpc import Context as Context
from ray_alpcrun.rpc import Stub as Stub
from ray_alpcrun.rpc import method_path as method_path
from ray_alpcrun.rpc import service_handler as service_handler

# Metadata keys (ALPCRUN_PROTOCOL.md 5.3). gRPC requires lower case.
MD_API_KEY = "api_key"
MD_NODE = "node"
MD_POD = "pod"
MD_SESSION_ID = "sessionid"
MD_WORKER_ID = "workerid"

# gRPC's own default: a real queue manager accepts no more unless configured to.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

Metadata = tuple[tuple[str, str], ...]


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


# gRPC's own reconnect backoff, under the callers' (the bridge retries with its own
# backoff and jitter): by default a channel waits 1 s, then 1.6 times longer after
# each failed connect (up to 2 minutes) before it even tries again, and every call
# meanwhile fails at once. After a link cut of 5 s the next connect came ~9 s in
# (issue 23's outside chaos run: median 9.5 s until a node answered again).
# ("grpc.min_reconnect_backoff_ms" is the connect timeout, 20 s: left as it is.)
RECONNECT_INITIAL_MS = 200
RECONNECT_MAX_MS = 2_000


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Client channel options. Keepalive pings only while calls are open, and no
    more often than gRPC servers accept by default (5 minutes): more frequent
    pings earn a GOAWAY "too_many_pings" that breaks every stream. Reconnects
    after a lost connection within ``RECONNECT_MAX_MS``."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 300_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Server options: message limits, and gRPC's default keepalive policy (a
    client may ping at most every 5 minutes; more often earns a GOAWAY
    "too_many_pings"), as a production server has it, so a client here that
    pings too often fails in tests too."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
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
