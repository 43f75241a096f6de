"""Is a port free to listen on? Asked with a plain socket before gRPC binds it.

gRPC's C core prints its own plain-text line ("Failed to add port to server")
to stderr when a bind fails, before Python hears of it; with ``--log-json``
that line breaks "every line is JSON", and ``GRPC_VERBOSITY`` is read when grpc
is imported, long before the CLI runs. So the devserver tries each port first
with a socket bound the way gRPC binds on Linux: ``SO_REUSEADDR`` (a port with
connections in TIME_WAIT is free), no ``SO_REUSEPORT`` (the devserver turns it
off too), so a port someone listens on fails with EADDRINUSE. The socket is
closed at once; a port taken between this check and gRPC's bind still fails in
gRPC (the race is covered there, with its line).
"""

from __future__ import annotations

import errno
import socket

from ray_alpcrun import errors

_ANY_HOST = ("", "0.0.0.0", "::", "[::]")


def check_free(host: str, port: int) -> None:
    """Raise ``errors.ConfigError`` when ``host:port`` cannot be listened on.

    Like gRPC, which listens on every address a host resolves to and fails only
    when none binds, this passes when any of them binds. Port 0 always passes.

    >>> check_free("127.0.0.1", 0)
    """
    if port == 0:
        return
    address = f"{host}:{port}"
    name = None if host in _ANY_HOST else host.strip("[]")
    try:
        candidates = socket.getaddrinfo(
            name, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except OSError as exc:
        raise errors.ConfigError(f"cannot listen on {address}: {exc}") from exc
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in candidates:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
            return
        except OSError as exc:
            failures.append(exc)
    if failures:
        # "in use" says what to do; e.g. a missing ::1 for "localhost" does not.
        failure = next((f for f in failures if f.errno == errno.EADDRINUSE), failures[0])
        reason = failure.strerror or str(failure)
        raise errors.ConfigError(f"cannot listen on {address}: {reason}") from failure
