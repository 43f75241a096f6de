"""The direct data path (ray_alpcrun.pool.direct) on real Ray actors: sub-batches
over each actor's Unix socket, with the ordinary path's guarantees."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.direct import DirectBackend
from tests.support import handlers


def config(**kwargs: Any) -> PoolConfig:
    kwargs.setdefault("num_actors", 2)
    kwargs.setdefault("min_chunk", 1)
    kwargs.setdefault("min_chunk_work_s", 0.0)
    kwargs.setdefault("data_path", "direct")
    return PoolConfig(**kwargs)


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
        frames = backend._parts.calls
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
        assert backend._parts.calls > frames
        await pool.end_session("s1")


@pytest.mark.usefixtures("ray_session")
async def test_many_small_batches_coalesce_and_each_gets_its_own_answers() -> None:
    async with ActorPool("tests.support.handlers:echo", config(num_actors=1)) as pool:
        backend = backend_of(pool)
        frames = backend._parts.calls
        streams = [[f"s{k}-t{i}".encode() for i in range(3)] for k in range(40)]
        outs = await asyncio.gather(*(pool.run(f"stream{k}", b) for k, b in enumerate(streams)))
        for batch, out in zip(streams, outs, strict=True):
            assert out == [(p, None) for p in batch]
        # 40 batches queued for one actor travelled in fewer frames.
        assert backend._parts.calls - frames < len(streams)


@pytest.mark.usefixtures("ray_session")
async def test_actor_killed_mid_batch_on_its_socket_loses_nothing(ray_session: Any) -> None:
    ray = ray_session
    name = f"gate-{uuid.uuid4().hex}"
    gate = ray.remote(num_cpus=0)(handlers.Gate).options(name=name).remote()
    try:
        async with ActorPool("tests.support.handlers:gated", config()) as pool:
            backend = backend_of(pool)
            ref = pool.put_shared("s", 1, name.encode())
            assert await pool.run("s", [b"warm"] * 4, shared=ref) == [(b"warm", None)] * 4
            batch = [f"t{i}".encode() for i in range(10)]
            batch[3] = b"block"
            running = asyncio.create_task(pool.run("s", batch, shared=ref))
            [victim] = await gate.wait_entered.remote()
            ray.kill(victim, no_restart=True)
            out = await asyncio.wait_for(running, 60)
            # Every task answered exactly once, the blocked one included (retried).
            assert out == [(p, None) for p in batch]
            assert pool.restarts == 1
            await pool.settle()
            members = pool._running().members()
            assert len(members) == 2 and all(backend.direct(m.actor) for m in members)
            assert await pool.run("s", [b"after"], shared=ref) == [(b"after", None)]
    finally:
        ray.kill(gate)


@pytest.mark.usefixtures("ray_session")
async def test_crashing_task_on_its_socket_fails_alone() -> None:
    async with ActorPool("tests.support.handlers:crash", config(max_call_retries=2)) as pool:
        batch = [b"a", b"b", b"crash", b"c", b"d", b"e"]
        out = await asyncio.wait_for(pool.run("s", batch), 120)
        for p, (result, error) in zip(batch, out, strict=True):
            if p == b"crash":
                assert result is None and error is not None and "actor died" in error
            else:
                assert (result, error) == (p, None)
        await pool.settle()
        assert await pool.run("s", [b"after"]) == [(b"after", None)]


@pytest.mark.usefixtures("ray_session")
async def test_hung_task_on_its_socket_times_out_alone() -> None:
    async with ActorPool("tests.support.handlers:hang", config(task_timeout_s=1.0)) as pool:
        batch = [b"a", b"hang", b"c", b"d"]
        out = await asyncio.wait_for(pool.run("s", batch), 120)
        for p, outcome in zip(batch, out, strict=True):
            if p == b"hang":
                assert outcome == (None, "task timed out after 1 s")
            else:
                assert outcome == (p, None)
