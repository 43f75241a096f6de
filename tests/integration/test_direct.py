"""The direct data path (ray_alpcrun.pool.direct) on real Ray actors: what is its
own (the flag, shared data by name). The guarantees it shares with ordinary
calls (deaths, crashes, hangs, coalescing) are in test_data_paths.py."""

from __future__ import annotations

from typing import Any

import pytest

from ray_alpcrun.config import PoolConfig
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
