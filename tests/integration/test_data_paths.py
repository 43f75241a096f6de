"""The pool's guarantees on each data path, on real Ray actors: ``direct`` (a Unix
socket per actor, the default) and ``calls`` (ordinary Ray actor calls). Each test
first checks that every actor is on its path, so what follows goes through it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from ray_alpcrun.pool.actor_pool import ActorPool
from tests.support import handlers
from tests.support.data_paths import config, on_path, sends

PATHS = pytest.mark.parametrize("path", ["direct", "calls"])


@PATHS
@pytest.mark.usefixtures("ray_session")
async def test_many_small_batches_coalesce_and_each_gets_its_own_answers(path: str) -> None:
    async with ActorPool("tests.support.handlers:echo", config(path, num_actors=1)) as pool:
        await on_path(pool)
        before = sends(pool)
        streams = [[f"s{k}-t{i}".encode() for i in range(3)] for k in range(40)]
        outs = await asyncio.gather(*(pool.run(f"stream{k}", b) for k, b in enumerate(streams)))
        for batch, out in zip(streams, outs, strict=True):
            assert out == [(p, None) for p in batch]
        # 40 batches queued for one actor travelled in fewer sends.
        assert sends(pool) - before < len(streams)


@PATHS
async def test_actor_killed_mid_batch_loses_nothing(path: str, ray_session: Any) -> None:
    ray = ray_session
    name = f"gate-{uuid.uuid4().hex}"
    gate = ray.remote(num_cpus=0)(handlers.Gate).options(name=name).remote()
    try:
        async with ActorPool("tests.support.handlers:gated", config(path)) as pool:
            ref = pool.put_shared("s", 1, name.encode())
            await on_path(pool, "s", shared=ref)
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
            await on_path(pool, "s", shared=ref)  # the replacement is on the path too
            assert (await pool.status())["live"] == 2
    finally:
        ray.kill(gate)


@PATHS
@pytest.mark.usefixtures("ray_session")
async def test_a_crashing_task_fails_alone(path: str) -> None:
    async with ActorPool("tests.support.handlers:crash", config(path, max_call_retries=2)) as pool:
        await on_path(pool)
        batch = [b"a", b"b", b"crash", b"c", b"d", b"e"]
        out = await asyncio.wait_for(pool.run("s", batch), 120)
        for p, (result, error) in zip(batch, out, strict=True):
            if p == b"crash":
                assert result is None and error is not None and "actor died" in error
            else:
                assert (result, error) == (p, None)
        await pool.settle()
        assert await pool.run("s", [b"after"]) == [(b"after", None)]


@PATHS
@pytest.mark.usefixtures("ray_session")
async def test_a_hung_task_times_out_alone(path: str) -> None:
    async with ActorPool("tests.support.handlers:hang", config(path, task_timeout_s=1.0)) as pool:
        await on_path(pool)
        batch = [b"a", b"hang", b"c", b"d"]
        out = await asyncio.wait_for(pool.run("s", batch), 120)
        for p, outcome in zip(batch, out, strict=True):
            if p == b"hang":
                assert outcome == (None, "task timed out after 1 s")
            else:
                assert outcome == (p, None)
