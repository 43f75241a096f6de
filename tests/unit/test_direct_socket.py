"""The direct path's socket (ray_alpcrun.pool.sockets), both ends, without Ray: it
serves exactly one peer, the bridge it was offered to, and the bridge talks only
to the actor that offered it. A frame is a pickle, so a frame read is code run."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

from ray_alpcrun.pool import sockets

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sockets.SUPPORTED, reason="no SO_PEERCRED here"),
]

# Another process of the same user that found the path: it sends a frame and
# reports how many bytes of an answer came first (0: the socket was closed).
SQUATTER = """
import pickle, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
frame = pickle.dumps(["from another process"])
try:
    s.sendall(struct.pack("!I", len(frame)) + frame)
    print(len(s.recv(65536)))
except (BrokenPipeError, ConnectionResetError):  # closed before or after the frame
    print(0)
"""


def _frame(parts: list[Any]) -> bytes:
    body = pickle.dumps(parts)
    return sockets.HEADER.pack(len(body)) + body


def _reply(conn: socket.socket) -> Any:
    with conn.makefile("rb") as stream:
        (size,) = sockets.HEADER.unpack(stream.read(sockets.HEADER.size))
        return pickle.loads(stream.read(size))


def test_the_socket_serves_its_bridge_only_and_only_once() -> None:
    ran: list[list[Any]] = []

    def run_many(parts: list[Any]) -> list[Any]:
        ran.append(parts)
        return [f"ran {p}" for p in parts]

    path = sockets.serve(run_many, bridge_pid=os.getpid())
    squatter = subprocess.run(
        [sys.executable, "-c", SQUATTER, path], capture_output=True, text=True, timeout=30
    )
    assert squatter.returncode == 0, squatter.stderr
    # Before: the squatter's frame ran, and its answer came back.
    assert squatter.stdout.strip() == "0" and ran == []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bridge:
        bridge.connect(path)
        bridge.sendall(_frame(["from the bridge"]))
        assert _reply(bridge) == ["ran from the bridge"]
        assert ran == [["from the bridge"]]
        # Before: the listener lived on; every later connection was served too.
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second,
            pytest.raises((FileNotFoundError, ConnectionRefusedError)),
        ):
            second.connect(path)
        assert not os.path.exists(os.path.dirname(path))


async def test_the_bridge_sends_nothing_to_a_socket_its_actor_does_not_serve(
    tmp_path: Any,
) -> None:
    path = str(tmp_path / "impostor.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as impostor:
        impostor.bind(path)
        impostor.listen(1)
        impostor.settimeout(30)
        other = os.getppid()  # a live process that is not the one serving the socket
        with pytest.raises(ConnectionError, match="not the actor"):
            await sockets.connect(path, actor_pid=other)
        conn, _ = impostor.accept()
        with conn:
            assert conn.recv(1) == b""  # closed without a byte sent


async def test_the_bridge_reaches_the_actor_that_offered_the_socket() -> None:
    path = sockets.serve(lambda parts: [p * 2 for p in parts], bridge_pid=os.getpid())
    reader, writer = await sockets.connect(path, actor_pid=os.getpid())
    try:
        writer.write(_frame([21]))
        (size,) = sockets.HEADER.unpack(await reader.readexactly(sockets.HEADER.size))
        assert pickle.loads(await reader.readexactly(size)) == [42]
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_bridge_that_dies_mid_frame_ends_the_socket_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A node bridge killed while its actor ran a frame: the actor's socket thread
    # died on the reply with a BrokenPipeError traceback in the actor's log (one per
    # actor of the node at every node-bridge kill of a chaos run).
    crashed: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    bridge_gone = threading.Event()

    def run_many(parts: list[Any]) -> list[Any]:
        bridge_gone.wait(10)
        return [b"x" * 100_000 for _ in parts]

    before = set(threading.enumerate())
    path = sockets.serve(run_many, bridge_pid=os.getpid())
    (server,) = set(threading.enumerate()) - before
    bridge = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bridge.connect(path)
    bridge.sendall(_frame(["part"]))
    bridge.close()
    bridge_gone.set()
    server.join(10)
    assert not server.is_alive() and crashed == []
