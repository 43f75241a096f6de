"""The direct data path (ray_alpcrun.pool.direct) on real Ray actors: what is its
own (the flag, shared data by name). The guarantees it shares with ordinary
calls (deaths, crashes, hangs, coalescing) are in test_data_paths.py."""

from __future__ import annotations

import asyncio
import os
import pickle
from typing import Any

import pytest

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool import sockets
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.direct import DirectBackend
from tests.support import data_paths


def config(**kwargs: Any) -> PoolConfig:
    return data_paths.config("direct", **kwargs)


def backend_of(pool: ActorPool) -> DirectBackend:
    backend = pool._backend
    assert isinstance(backend, DirectBackend)
    return backend


def test_the_flag_reaches_the_pool_config() -> None:
    from ray_alpcrun.bridge import cli
    from ray_alpcrun.config import Env

    parser = cli.build_parser(Env())
    args = parser.parse_args(["--handler", "x:y", "--actors", "2", "--data-path", "direct"])
    assert cli.config_from_args(args, Env()).pool.data_path == "direct"  # type: ignore[union-attr]


@pytest.mark.usefixtures("ray_session")
async def test_batches_and_shared_levels_go_over_the_sockets() -> None:
    async with ActorPool("tests.support.handlers:echo", config()) as pool:
        backend = backend_of(pool)
        status = await pool.status()
        assert [a["data_path"] for a in status["actors"]] == ["direct", "direct"]
        one = pool.put_shared("s1", 1, b"ONE")
        two = pool.put_shared("s1", 2, b"TWO")
        frames = backend.sends
        # First use of a level on an actor: named over the socket, then once with
        # the reference as an ordinary call; after that, over the socket only.
        for _ in range(3):
            out = await pool.run("s1", [b"a", b"fail-me", b"c", b"d"], shared=one)
            assert out == [
                (b"a|ONE", None),
                (None, "ValueError: asked to fail: fail-me"),
                (b"c|ONE", None),
                (b"d|ONE", None),
            ]
            assert await pool.run("s1", [b"x", b"y"], shared=two) == [
                (b"x|TWO", None),
                (b"y|TWO", None),
            ]
            assert await pool.run("s1", [b"z"]) == [(b"z", None)]  # none asked: none given
        assert backend.sends > frames
        await pool.end_session("s1")


@pytest.mark.usefixtures("ray_session")
async def test_each_offered_socket_serves_its_bridge_once() -> None:
    import ray

    async with ActorPool("tests.support.handlers:echo", config(num_actors=1)) as pool:
        [actor] = backend_of(pool).handles.values()
        node = ray.get_runtime_context().get_node_id()
        # Offered to another process: this one reaches the actor, which refuses it unread.
        path, actor_pid = await actor.open_direct.remote(node, os.getppid())
        reader, writer = await sockets.connect(path, actor_pid)
        writer.write(_frame([("s", [b"not run"], None, ())]))
        assert await _closed_unanswered(reader)
        writer.close()
        # Offered to this process: served, and nobody after it.
        path, actor_pid = await actor.open_direct.remote(node, os.getpid())
        reader, writer = await sockets.connect(path, actor_pid)
        writer.write(_frame([("s", [b"run"], None, ())]))
        (size,) = sockets.HEADER.unpack(await reader.readexactly(sockets.HEADER.size))
        [(outcomes, _seconds)] = pickle.loads(await reader.readexactly(size))
        assert outcomes == [(b"run", None)]
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            await sockets.connect(path, actor_pid)
        writer.close()
        assert (await pool.status())["actors"][0]["tasks_done"] == 1


async def _closed_unanswered(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read() == b""
    except (BrokenPipeError, ConnectionResetError):  # closed before or after our frame, unread
        return True


def _frame(parts: list[Any]) -> bytes:
    body = pickle.dumps(parts)
    return sockets.HEADER.pack(len(body)) + body
