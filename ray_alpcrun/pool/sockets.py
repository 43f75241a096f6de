"""The direct data path's socket, both ends (the design is in
:mod:`ray_alpcrun.pool.direct`): length-prefixed pickle frames over an
owner-only Unix socket that serves exactly one peer, the bridge. Plain sockets,
threads and asyncio; no Ray.

A frame is unpickled, so whoever may send one can run code in the process that
reads it. Hence each :func:`serve` listens for one connection only: it checks
the kernel's word for who connected (``SO_PEERCRED``, not something the peer
says) and refuses every process but the bridge that asked for the socket
without reading a byte from it; once the bridge is connected, or after
``accept_timeout_s`` without it, the listener is closed and its file removed,
so a second connection finds nothing to connect to. The bridge checks the
other way round (:func:`connect`): the socket it reached must be served by the
actor that offered it, before it sends anything. Why not
``multiprocessing.connection`` with an ``authkey``: its ``Listener.accept``
reads the HMAC answer of whoever connected first, so a peer that connects and
stays silent holds the only accept (and the bridge's blocking ``Client``, which
cannot be cancelled from asyncio); the kernel's credentials cost no round trip
and nothing can stall them. Where the platform has no ``SO_PEERCRED``
(:data:`SUPPORTED`), the actors serve ordinary calls only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
"""Each frame: its length (4 bytes, network order), then a pickle."""

SUPPORTED = hasattr(socket, "SO_PEERCRED")
"""Whether peers can be told apart here (Linux): else no direct path."""

ACCEPT_TIMEOUT_S = 60.0
"""How long an offered socket waits for its bridge before it closes."""

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a connected Unix socket, as the
    kernel recorded it (0 when that process is in a pid namespace not visible here)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, _uid, _gid = _PEERCRED.unpack(creds)
    return int(pid)


def serve(
    run_many: Callable[[list[Any]], list[Any]],
    bridge_pid: int,
    accept_timeout_s: float = ACCEPT_TIMEOUT_S,
) -> str:
    """Offer a new owner-only Unix socket to the bridge process ``bridge_pid`` and
    answer its frames of ``[RunArgs, ...]`` with ``run_many`` from a daemon thread;
    returns the socket's path. Serves one connection, the bridge's, and no other."""
    directory = tempfile.mkdtemp(prefix="alpcrun-direct-")  # 0700
    path = os.path.join(directory, "actor.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o600)  # before listen(): nobody can connect until then
        server.listen(1)
    except BaseException:
        server.close()
        _remove(path)
        raise
    deadline = time.monotonic() + accept_timeout_s
    threading.Thread(
        target=_serve_one,
        args=(server, path, bridge_pid, deadline, run_many),
        name="alpcrun-direct",
        daemon=True,
    ).start()
    return path


def _serve_one(
    server: socket.socket,
    path: str,
    bridge_pid: int,
    deadline: float,
    run_many: Callable[[list[Any]], list[Any]],
) -> None:
    try:
        conn = _accept_bridge(server, bridge_pid, deadline)
    finally:  # one peer per offer: nobody connects after it (a new bridge asks anew)
        server.close()
        _remove(path)
    if conn is not None:
        _answer(conn, run_many)


def _accept_bridge(server: socket.socket, bridge_pid: int, deadline: float) -> socket.socket | None:
    while (left_s := deadline - time.monotonic()) > 0:
        server.settimeout(left_s)
        try:
            conn, _ = server.accept()
        except TimeoutError:
            break
        except OSError as exc:
            log.warning("direct socket closed before the bridge connected: %s", exc)
            return None
        pid = peer_pid(conn)
        if pid == bridge_pid:
            conn.settimeout(None)
            return conn
        # Closed unread: not one byte of its frames is unpickled.
        log.warning("direct socket refused pid %d (offered to the bridge, pid %d)", pid, bridge_pid)
        conn.close()
    log.warning("direct socket: the bridge (pid %d) did not connect; closed", bridge_pid)
    return None


def _answer(conn: socket.socket, run_many: Callable[[list[Any]], list[Any]]) -> None:
    with conn, conn.makefile("rb") as stream:
        try:
            while True:
                head = stream.read(HEADER.size)
                if len(head) < HEADER.size:
                    return  # the bridge closed its end
                (size,) = HEADER.unpack(head)
                parts = pickle.loads(stream.read(size))
                reply = pickle.dumps(run_many(parts), pickle.HIGHEST_PROTOCOL)
                conn.sendall(HEADER.pack(len(reply)) + reply)
        except ConnectionError as exc:  # the bridge died (a new one asks for a new socket)
            log.info("direct socket: the bridge is gone (%s)", exc)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


async def connect(path: str, actor_pid: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The bridge's end: connect to the socket at ``path`` and check that the
    process serving it is ``actor_pid`` before anything is sent or read.
    Raises :class:`ConnectionError` (an ``OSError``) for any other process."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        pid = peer_pid(sock)
        if pid != actor_pid:
            raise ConnectionError(f"{path} is served by pid {pid}, not the actor (pid {actor_pid})")
        return await asyncio.open_unix_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
