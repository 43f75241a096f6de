"""What the bridge's gRPC side is configured with, and its connection policy:
how long to wait before reconnecting, and which failed calls no retry can fix
(a wrong API key, TLS trust, proto package: the bridge stops with a
:class:`~ray_alpcrun.errors.FatalError` and a named exit code). Never imports Ray.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ray_alpcrun import errors, transport

_TLS_WORDS = ("ssl", "tls", "certificate", "handshake", "x509")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What the gRPC side needs; built by the CLI from ``BridgeConfig``."""

    queue_address: str
    cache_address: str
    api_key: str | None = field(repr=False)  # never in reprs, logs, tracebacks
    proto_package: str
    node: str
    pod: str
    slots: int
    tls: transport.TlsFiles | None = None  # to the queue manager
    cache_tls: transport.TlsFiles | None = None  # to the node cache; None: plaintext
    max_message_bytes: int = transport.DEFAULT_MAX_MESSAGE_BYTES
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    max_connect_attempts: int | None = None
    drain_timeout_s: float = 30.0
    session_linger_s: float = 30.0


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, initial_s * (2.0**attempt)))


def fatal_for(
    exc: errors.RpcError, settings: WorkerSettings, what: str
) -> errors.FatalError | None:
    """The fatal error a failed call means, or None if retrying may help."""
    if isinstance(exc, errors.AuthError):
        return errors.FatalError(
            errors.EXIT_AUTH,
            f"the {what} rejected the API key ({exc.code}: {exc.details}); set "
            "METALCORE_API_KEY or --api-key to the key the services were started with",
        )
    cache = what == "node cache"
    tls = settings.cache_tls if cache else settings.tls
    flag = "--cache-ca-cert" if cache else "--ca-cert"
    if exc.code == "UNAVAILABLE" and tls and any(w in exc.details.lower() for w in _TLS_WORDS):
        return errors.FatalError(
            errors.EXIT_TLS,
            f"TLS to the {what} failed ({exc.details}); check {flag} "
            f"({tls.ca_cert}) and the server's certificate",
        )
    if exc.code == "UNIMPLEMENTED":
        return errors.FatalError(
            errors.EXIT_CONFIG,
            f"the {what} does not serve this RPC under proto package "
            f"{settings.proto_package!r}; check --proto-package",
        )
    return None
