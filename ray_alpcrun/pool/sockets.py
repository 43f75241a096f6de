"""Length-prefixed pickle frames over an owner-only Unix socket: the pool actor's
side of the direct data path (the bridge's side and the design are in
:mod:`ray_alpcrun.pool.direct`). Plain sockets and threads, no Ray."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("!I")
"""Each frame: its length (4 bytes, network order), then a pickle."""


def serve(run_many: Callable[[list[Any]], list[Any]]) -> str:
    """Listen on a new owner-only Unix socket and answer frames of ``[RunArgs, ...]``
    with ``run_many`` from daemon threads, one per connection; returns its path."""
    path = os.path.join(tempfile.mkdtemp(prefix="alpcrun-direct-"), "actor.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)  # before listen(): nobody can connect until then
    server.listen(4)

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_answer, args=(conn, run_many), daemon=True).start()

    threading.Thread(target=accept, name="alpcrun-direct", daemon=True).start()
    return path


def _answer(conn: socket.socket, run_many: Callable[[list[Any]], list[Any]]) -> None:
    with conn, conn.makefile("rb") as stream:
        while True:
            head = stream.read(HEADER.size)
            if len(head) < HEADER.size:
                return  # the bridge closed its end
            (size,) = HEADER.unpack(head)
            parts = pickle.loads(stream.read(size))
            reply = pickle.dumps(run_many(parts), pickle.HIGHEST_PROTOCOL)
            conn.sendall(HEADER.pack(len(reply)) + reply)
