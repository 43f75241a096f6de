"""The compiled-graph data path (ray_alpcrun.pool.compiled) on real Ray actors.

Each test first runs batches until every actor's graph is up, so what follows
goes through the graphs and not the ordinary calls that serve meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool import compiled
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.compiled import CompiledBackend
from tests.support import data_paths


def test_data_path_flag_reaches_the_pool_config() -> None:
    from ray_alpcrun.bridge import cli
    from ray_alpcrun.config import Env
    from ray_alpcrun.errors import ConfigError

    parser = cli.build_parser(Env())
    base = ["--handler", "tests.support.handlers:echo"]
    default = cli.config_from_args(parser.parse_args([*base, "--actors", "2"]), Env())
    assert default.pool is not None and default.pool.data_path == "direct"
    args = parser.parse_args([*base, "--actors", "2", "--data-path", "compiled"])
    assert cli.config_from_args(args, Env()).pool.data_path == "compiled"  # type: ignore[union-attr]
    sized_later = cli.config_from_args(parser.parse_args([*base, "--data-path", "compiled"]), Env())
    # Without --actors the pool's size comes from the cluster; its other settings stay.
    assert sized_later.size_pool_from_cluster and sized_later.data_path == "compiled"
    assert sized_later.pool is not None and sized_later.pool.data_path == "compiled"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--data-path", "rpc"])
    with pytest.raises(ConfigError):
        PoolConfig(data_path="rpc")


def config(**kwargs: Any) -> PoolConfig:
    return data_paths.config("compiled", **kwargs)


async def warm(pool: ActorPool, session: str = "warm", **kw: Any) -> None:
    """Run small batches until every live actor's graph is up (bounded)."""
    await data_paths.on_path(pool, session, **kw)


def backend_of(pool: ActorPool) -> CompiledBackend:
    backend = pool._backend
    assert isinstance(backend, CompiledBackend)
    return backend


@pytest.mark.usefixtures("ray_session")
async def test_batches_and_shared_data_go_through_the_graphs() -> None:
    async with ActorPool("tests.support.handlers:echo", config()) as pool:
        ref = pool.put_shared("s1", 1, b"common")
        await warm(pool, "s1", shared=ref)
        backend = backend_of(pool)
        builds = backend.builds
        out = await pool.run("s1", [b"a", b"fail-me", b"c", b"d"], shared=ref)
        assert out == [
            (b"a|common", None),
            (None, "ValueError: asked to fail: fail-me"),
            (b"c|common", None),
            (b"d|common", None),
        ]
        status = await pool.status()
        assert [a["data_path"] for a in status["actors"]] == ["compiled", "compiled"]
        await pool.end_session("s1")  # through the graph, ordered after the batches
        assert backend.builds == builds == 2


@pytest.mark.usefixtures("ray_session")
async def test_an_idle_graph_is_torn_down_and_rebuilt_with_work() -> None:
    async with ActorPool(
        "tests.support.handlers:echo", config(num_actors=1, compiled_idle_s=0.3)
    ) as pool:
        await warm(pool)
        backend = backend_of(pool)
        [member] = pool._running().members()
        for _ in range(200):  # the idle timer fires 0.3 s after the last step
            if not backend.graph_ready(member.actor):
                break
            await asyncio.sleep(0.05)  # ok: waiting for the idle timer itself
        assert not backend.graph_ready(member.actor)
        assert await pool.run("s", [b"x"]) == [(b"x", None)]  # served meanwhile
        await warm(pool)
        assert backend.builds >= 2


@pytest.mark.usefixtures("ray_session")
async def test_the_elastic_pool_grows_and_shrinks_on_the_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An actor the elastic pool adds gets its graph; one it releases has its graph
    torn down first; every task is answered exactly once throughout."""
    monkeypatch.setattr(compiled, "_STABLE_S", 0.0)  # graphs for young actors too
    cfg = config(num_actors=1, min_actors=1, max_actors=2, downscale_delay_s=1.0)
    async with ActorPool("tests.support.handlers:nap", cfg) as pool:
        backend = backend_of(pool)
        dispatcher = pool._running()
        sent = 0

        async def load(until: Callable[[], bool]) -> None:
            """Slow batches, six at a time, until ``until()``; each answered once."""
            nonlocal sent
            for _ in range(600):
                if until():
                    return
                batches = [[b"nap:0.02", b"x%d" % (sent + k)] for k in range(6)]
                sent += 6
                outs = await asyncio.gather(*(pool.run("load", b) for b in batches))
                assert outs == [[(p, None) for p in b] for b in batches]
            raise AssertionError("the pool did not get there")

        def both_on_graphs() -> bool:
            members = dispatcher.members()
            return len(members) == 2 and all(backend.graph_ready(m.actor) for m in members)

        await load(both_on_graphs)  # more in flight than one actor takes: it grows
        assert backend.builds >= 2
        teardowns = backend.teardowns
        for _ in range(300):  # idle: back to min_actors after the downscale delay
            if dispatcher.size == 1:
                break
            await asyncio.sleep(0.05)  # ok: waits for the scaler's downscale delay
        assert dispatcher.size == 1 and dispatcher.released >= 1
        assert backend.teardowns > teardowns  # the released actor's graph went first
        tail = [b"t%d" % i for i in range(50)]
        assert await pool.run("after", tail) == [(p, None) for p in tail]
