"""ActorPool on real Ray actors: handler forms, sessions, shared data, faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.errors import ConfigError, HandlerError, SessionSetupError
from ray_alpcrun.handler import Handler, HandlerSpec, SessionContext
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.backend import RayBackend, actor_key
from ray_alpcrun.pool.cluster_pool import ClusterPool
from ray_alpcrun.pool.direct import DirectBackend
from ray_alpcrun.pool.interfaces import Member
from tests.support import handlers

pytestmark = pytest.mark.usefixtures("ray_session")


def small(**kwargs: Any) -> PoolConfig:
    kwargs.setdefault("num_actors", 2)
    kwargs.setdefault("min_chunk", 1)
    kwargs.setdefault("min_chunk_work_s", 0.0)  # split even tiny tasks: tests reach every actor
    return PoolConfig(**kwargs)


def ray_backend(pool: ActorPool) -> RayBackend:
    backend = pool._backend
    inner = backend._inner if isinstance(backend, DirectBackend) else backend
    assert isinstance(inner, RayBackend)
    return inner


def members_of(pool: ActorPool) -> list[Member[Any]]:
    assert pool._membership is not None
    return pool._membership.members()


@pytest.fixture
async def echo_pool() -> AsyncIterator[ActorPool]:
    pool = ActorPool("tests.support.handlers:echo", small())
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture
async def counter_pool() -> AsyncIterator[ActorPool]:
    pool = ActorPool(handlers.Counter, small())
    await pool.start()
    yield pool
    await pool.close()


def decoded(outcomes: list[tuple[bytes | None, str | None]]) -> list[dict[str, Any]]:
    out = []
    for result, error in outcomes:
        assert error is None and result is not None
        out.append(json.loads(result))
    return out


async def test_function_handler_by_name_with_shared_data_and_errors(echo_pool: ActorPool) -> None:
    ref = echo_pool.put_shared("s1", 1, b"common")
    out = await echo_pool.run("s1", [b"a", b"fail-me", b"c", b"d"], shared=ref)
    assert out == [
        (b"a|common", None),
        (None, "ValueError: asked to fail: fail-me"),
        (b"c|common", None),
        (b"d|common", None),
    ]
    assert await echo_pool.run("s2", [b"x"]) == [(b"x", None)]
    assert echo_pool.size == 2 and echo_pool.restarts == 0


async def test_function_handler_by_value_and_class_instance() -> None:
    def shout(payload: bytes, shared: bytes | None) -> bytes:  # pickled by value
        return payload.upper()

    class Doubler(Handler):
        def process(self, payload: bytes, session: SessionContext) -> bytes:
            return payload * 2

    specs: list[tuple[HandlerSpec, bytes]] = [(shout, b"AB"), (Doubler(), b"abab")]
    for spec, expected in specs:
        async with ActorPool(spec, small(num_actors=1)) as pool:
            assert await pool.run("s", [b"ab"]) == [(expected, None)]


async def test_per_session_state_and_shared_levels(counter_pool: ActorPool) -> None:
    pool = counter_pool
    level1 = pool.put_shared("A", 1, json.dumps({"v": 1}).encode())
    rows = []
    for _ in range(3):
        rows += decoded(await pool.run("A", [b"a1", b"a2", b"a3", b"a4"], shared=level1))
    # Each actor counts session A's tasks 1, 2, 3, ... across batches.
    by_pid: dict[int, list[int]] = {}
    for row in rows:
        assert (row["session"], row["level"], row["shared"]) == ("A", 1, {"v": 1})
        by_pid.setdefault(row["pid"], []).append(row["count"])
    assert len(by_pid) == 2
    for counts in by_pid.values():
        assert counts == list(range(1, len(counts) + 1))
    # Session B has its own state.
    other = decoded(await pool.run("B", [b"b1"]))
    assert other[0]["count"] == 1 and other[0]["level"] is None

    status = await pool.status()
    assert [a["shared_decodes"] for a in status["actors"]] == [1, 1]

    level2 = pool.put_shared("A", 2, json.dumps({"v": 2}).encode())
    rows = decoded(await pool.run("A", [b"a5", b"a6"], shared=level2))
    assert {row["pid"] for row in rows} == set(by_pid)
    for row in rows:
        assert (row["level"], row["shared"], row["updates"]) == (2, {"v": 2}, [[1, 2]])
    # A batch that asks for an older level gets exactly that level (still decoded
    # on each actor, so no new decode), and the update hook does not fire again.
    rows = decoded(await pool.run("A", [b"a7", b"a8"], shared=level1))
    for row in rows:
        assert (row["level"], row["shared"], row["updates"]) == (1, {"v": 1}, [[1, 2]])
    # A batch without shared data sees none.
    rows = decoded(await pool.run("A", [b"a9", b"a10"]))
    assert {(row["level"], row["shared"]) for row in rows} == {(None, None)}
    status = await pool.status()
    assert [a["shared_decodes"] for a in status["actors"]] == [2, 2]


async def test_session_end_runs_the_hook_and_frees_state(counter_pool: ActorPool) -> None:
    pool = counter_pool
    await pool.run("gone", [b"x", b"y"])
    assert all("gone" in a["sessions"] for a in (await pool.status())["actors"])
    await pool.end_session("gone")
    status = await pool.status()
    assert all("gone" not in a["sessions"] for a in status["actors"])
    answers = decoded(await pool.run("probe", [b"ended?", b"ended?"]))
    assert len({a["pid"] for a in answers}) == 2
    assert all(a["ended"] == ["gone"] for a in answers)
    # Starting it again starts from scratch.
    assert decoded(await pool.run("gone", [b"z"]))[0]["count"] == 1


async def test_handler_error_and_setup_error() -> None:
    async with ActorPool("tests.support.handlers:Counter", small()) as pool:
        out = await pool.run("s", [b"ok", b"boom"])
        assert out[1] == (None, "RuntimeError: boom requested")
    async with ActorPool(handlers.BrokenStart, small(num_actors=1)) as pool:
        with pytest.raises(SessionSetupError, match="cannot start session"):
            await pool.run("s", [b"a"])


@pytest.mark.parametrize(
    "spec",
    ["tests.support.handlers:missing", "no_such_module_xyz:f", "tests.support.handlers:BrokenInit"],
)
async def test_handler_that_cannot_load_fails_start(spec: str) -> None:
    pool = ActorPool(spec, small(num_actors=1))
    with pytest.raises(HandlerError):
        await pool.start()


async def test_more_gpus_than_the_cluster_has_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="GPU"):
        await ActorPool("tests.support.handlers:echo", small(gpus_per_actor=1.0)).start()
    with pytest.raises(ConfigError, match="CPU"):
        await ActorPool(
            "tests.support.handlers:echo", small(num_actors=3, cpus_per_actor=100)
        ).start()


async def test_shared_data_is_bytes_or_a_zero_copy_view() -> None:
    data = b"abc" * 1000
    async with ActorPool("tests.support.handlers:shared_type", small(num_actors=1)) as pool:
        ref = pool.put_shared("s", 1, data)
        assert await pool.run("s", [b"?"], shared=ref) == [(b"bytes", None)]
    async with ActorPool(
        "tests.support.handlers:shared_type_zero_copy", small(num_actors=1)
    ) as pool:
        ref = pool.put_shared("s", 1, data)
        assert await pool.run("s", [b"?"], shared=ref) == [(b"memoryview", None)]
    async with ActorPool(handlers.ZeroCopy, small(num_actors=1)) as pool:
        ref = pool.put_shared("s", 1, data)
        assert await pool.run("s", [b"?"], shared=ref) == [(b"memoryview:abc", None)]


async def test_actor_killed_mid_batch_loses_nothing(ray_session: Any) -> None:
    ray = ray_session
    name = f"gate-{uuid.uuid4().hex}"
    gate = ray.remote(num_cpus=0)(handlers.Gate).options(name=name).remote()
    try:
        async with ActorPool("tests.support.handlers:gated", small()) as pool:
            ref = pool.put_shared("s", 1, name.encode())
            batch = [f"t{i}".encode() for i in range(10)]
            batch[3] = b"block"
            running = asyncio.create_task(pool.run("s", batch, shared=ref))
            [victim] = await gate.wait_entered.remote()
            # Status answers from its own thread even while a task blocks.
            busy = await pool.status()
            assert [a.get("error") for a in busy["actors"]] == [None, None]
            ray.kill(victim, no_restart=True)
            out = await running
            assert out == [(p, None) for p in batch]
            assert pool.restarts == 1
            await pool.settle()
            assert ray_backend(pool).recycled == 0  # killed for good: a new actor
            # The victim answered nothing; the survivors answered each task once.
            await pool.settle()
            status = await pool.status()
            assert status["live"] == 2
            assert sum(a["tasks_done"] for a in status["actors"]) == len(batch)
    finally:
        ray.kill(gate)


async def test_an_actor_whose_process_dies_comes_back_as_the_same_ray_actor(
    ray_session: Any,
) -> None:
    """Its owner keeps Ray's state per actor id for good (``benchmarks/actor_churn.py``):
    a lost actor's process comes back as a restart of the same actor, not a new one."""
    ray = ray_session
    name = f"gate-{uuid.uuid4().hex}"
    gate = ray.remote(num_cpus=0)(handlers.Gate).options(name=name).remote()
    try:
        async with ActorPool("tests.support.handlers:gated", small()) as pool:
            ids = {actor_key(m.actor) for m in members_of(pool)}
            ref = pool.put_shared("s", 1, name.encode())
            batch = [f"t{i}".encode() for i in range(10)]
            batch[3] = b"block"
            running = asyncio.create_task(pool.run("s", batch, shared=ref))
            [victim] = await gate.wait_entered.remote()
            pid = int((await victim.status.remote())["pid"])
            os.kill(pid, signal.SIGKILL)
            out = await running
            assert out == [(p, None) for p in batch]
            assert pool.restarts == 1
            await pool.settle()
            assert ray_backend(pool).recycled == 1
            assert {actor_key(m.actor) for m in members_of(pool)} == ids
            status = await pool.status()
            pids = [a["pid"] for a in status["actors"]]
            assert status["live"] == 2 and pid not in pids, pids
            # The restarted actor serves: a session on every actor answers.
            many = [f"u{i}".encode() for i in range(20)]
            assert await pool.run("s2", many, shared=ref) == [(p, None) for p in many]
    finally:
        ray.kill(gate)


async def test_the_probe_replaces_an_actor_that_ray_restarted_by_itself(ray_session: Any) -> None:
    """A node bridge died with its node: the coordinator probes the actors it served.
    Ray restarts a lost one by itself (elsewhere); answering, it was taken as live,
    so the pool kept the lost node wanted and started node bridges there (544 in
    the long chaos run), each failing "not schedulable"."""
    ray = ray_session
    own = ray.get_runtime_context().get_node_id()
    async with ClusterPool("tests.support.handlers:echo", small(), own) as pool:
        member = members_of(pool)[0]
        assert await pool.probe(member)
        pid = int((await member.actor.status.remote())["pid"])
        os.kill(pid, signal.SIGKILL)
        for _ in range(300):  # bounded: Ray restarts it in about 2 s
            try:
                if int((await member.actor.status.remote())["pid"]) != pid:
                    break
            except ray.exceptions.RayActorError:
                pass
            await asyncio.sleep(0.1)  # ok: Ray's restart has no event to wait on
        else:
            raise AssertionError("Ray did not restart the actor")
        assert not await pool.probe(member)
        assert await pool.probe(members_of(pool)[1])


async def test_hung_task_times_out_and_the_rest_succeed() -> None:
    async with ActorPool("tests.support.handlers:hang", small(task_timeout_s=0.5)) as pool:
        batch = [b"a", b"b", b"hang", b"c", b"d", b"e"]
        out = await pool.run("s", batch)
        for p, outcome in zip(batch, out, strict=True):
            if p == b"hang":
                assert outcome == (None, "task timed out after 0.5 s")
            else:
                assert outcome == (p, None)
        assert pool.restarts >= 1
        # The pool still serves after replacing the stuck actor: Ray restarted it,
        # as the pool killed the old process that still answered (hung).
        assert await pool.run("s", [b"after"]) == [(b"after", None)]
        assert ray_backend(pool).recycled >= 1


async def test_a_crashing_handler_fails_only_its_own_task() -> None:
    async with ActorPool("tests.support.handlers:crash", small(max_call_retries=2)) as pool:
        batch = [b"a", b"b", b"crash", b"c", b"d", b"e"]
        out = await pool.run("s", batch)
        for p, (result, error) in zip(batch, out, strict=True):
            if p == b"crash":
                assert result is None and error is not None
                assert error.startswith("actor died 3 times")
            else:
                assert (result, error) == (p, None)
        # Two deaths of the sub-batch, then three of the culprit running alone.
        assert pool.restarts == 5


async def test_a_memory_hog_fails_only_its_own_task_under_the_actor_memory_cap() -> None:
    config = small(memory_limit_bytes=1 << 30)
    async with ActorPool("tests.support.chaos_handlers:hog", config) as pool:
        batch = [b"a", b"hog:4096", b"b"]
        out = await pool.run("s", batch)
        assert out[0] == (b"a", None) and out[2] == (b"b", None)
        assert out[1][0] is None and out[1][1] is not None and "MemoryError" in out[1][1]
        assert pool.restarts == 0  # contained in the task: the actor lives on
        assert await pool.run("s", [b"c"]) == [(b"c", None)]


async def test_an_elastic_pool_counts_the_actors_it_releases_while_it_holds_batches() -> None:
    config = small(min_actors=1, max_actors=2, downscale_delay_s=0.2)
    async with ActorPool("tests.support.handlers:nap", config) as pool:
        # Two batches grow the pool to two actors; the short one ends while the
        # long one still runs, so one actor is released under load: an idle one,
        # or, where the second actor starts slowly (after the memory hog's pool,
        # on CI), the one still starting.
        long = asyncio.ensure_future(pool.run("s", [b"nap:10"]))
        assert await pool.run("s", [b"nap:0.3"]) == [(b"nap:0.3", None)]
        for _ in range(300):  # the second actor may start slowly on a loaded machine
            if pool.scale_status()["released"] or long.done():
                break
            await asyncio.sleep(0.05)  # ok: polling the pool's counters (bounded)
        scale = pool.scale_status()
        assert not long.done(), "the long batch ended before the pool shrank"
        assert scale["requested"] == 1 and scale["released"] == 1, scale
        assert scale["released_under_load"] == 1, scale
        assert await long == [(b"nap:10", None)]
        assert pool.live == 1
