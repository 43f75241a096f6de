"""The elastic pool's rules (pure) and the dispatcher growing and shrinking: no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_alpcrun.bridge.cli import build_parser, config_from_args
from ray_alpcrun.config import Env, PoolConfig
from ray_alpcrun.errors import ConfigError
from ray_alpcrun.pool.cluster import ClusterView, check_request
from ray_alpcrun.pool.scaling import (
    NodeType,
    Scaler,
    actors_per_node,
    cluster_capacity,
    desired_actors,
    target_slots,
)
from tests.support.fake_backend import FakeActor, FakeBackend, payloads, started

# -- rules -------------------------------------------------------------------------


def test_desired_actors_follows_batches_within_bounds() -> None:
    assert desired_actors(0, 1.0, 0, 3) == 0
    assert desired_actors(1, 1.0, 0, 3) == 1
    assert desired_actors(5, 2.0, 0, 10) == 3
    assert desired_actors(50, 1.0, 0, 3) == 3
    assert desired_actors(0, 1.0, 2, 3) == 2


def test_target_slots_keeps_one_spare_while_the_pool_may_grow() -> None:
    assert target_slots(0, 0, 3) == 1  # zero actors: one slot, so work can reach us
    assert target_slots(1, 1, 3) == 3
    assert target_slots(3, 0, 3) == 3  # at the ceiling: no spare
    assert target_slots(2, 0, 4, per_actor=2) == 5


def test_actors_per_node_shares_a_gpu_only_below_one() -> None:
    node = {"CPU": 8.0, "GPU": 2.0}
    assert actors_per_node(node, 1, 1) == 2
    assert actors_per_node(node, 1, 0.4) == 4  # two per GPU, not two and a half
    assert actors_per_node(node, 4, 0) == 2
    assert actors_per_node({"CPU": 4.0}, 1, 1) == 0
    types = [NodeType("gpu", node, 3), NodeType("cpu", {"CPU": 16.0}, 2)]
    assert cluster_capacity(types, 1, 1) == 6
    assert cluster_capacity([NodeType("gpu", node, -1)], 1, 1) is None


def test_scale_down_waits_for_the_delay_and_up_is_at_once() -> None:
    s = Scaler(lowest=0, highest=3, target_per_actor=1.0, downscale_delay_s=5.0)
    up = s.decide(batches=2, live=0, pending=0, now=0.0)
    assert (up.target, up.start, up.release) == (2, 2, 0) and "2 batch(es)" in up.reason
    assert s.decide(batches=0, live=2, pending=0, now=1.0).release == 0
    assert s.decide(batches=0, live=2, pending=0, now=5.9).release == 0
    down = s.decide(batches=0, live=2, pending=0, now=6.0)
    assert down.release == 2 and "downscale delay" in down.reason
    # Load coming back resets the delay.
    assert s.decide(batches=1, live=1, pending=0, now=7.0).release == 0
    assert s.decide(batches=0, live=1, pending=0, now=8.0).release == 0
    floor = Scaler(lowest=2, highest=3, target_per_actor=1.0, downscale_delay_s=0.0)
    assert floor.decide(0, 0, 0, 0.0).start == 2  # never below --min-actors


# -- what can never fit --------------------------------------------------------------


def autoscaler(*types: NodeType, live: list[NodeType] | None = None) -> ClusterView:
    head = NodeType("head", {"CPU": 0.0}, 1)
    return ClusterView("autoscaler", list(types), live if live is not None else [head])


def test_a_growing_cluster_with_no_gpu_node_yet_is_not_an_error() -> None:
    view = autoscaler(NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 4))
    assert check_request(view, lowest=2, highest=8, cpus=1, gpus=1) == 0  # fits now: none
    unknown = ClusterView("autoscaling", [], [NodeType("head", {"CPU": 0.0}, 1)])
    assert check_request(unknown, lowest=2, highest=8, cpus=1, gpus=1) == 0


def test_a_shape_no_node_type_offers_fails_and_says_so() -> None:
    view = autoscaler(NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 4))
    with pytest.raises(ConfigError, match=r"no node type .* offers .*2 GPU.*gpu: 4 CPU, 1 GPU"):
        check_request(view, lowest=0, highest=3, cpus=1, gpus=2)


def test_more_than_the_cluster_can_ever_hold_fails() -> None:
    view = autoscaler(NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 2))
    with pytest.raises(ConfigError, match=r"--min-actors 3 .* at most 2"):
        check_request(view, lowest=3, highest=3, cpus=1, gpus=1)
    check_request(view, lowest=0, highest=5, cpus=1, gpus=1)  # a ceiling above: a warning


# -- the command line ------------------------------------------------------------------


def parse(*argv: str) -> Any:
    env = Env()
    args = build_parser(env).parse_args(["--handler", "tests.support.handlers:echo", *argv])
    return config_from_args(args, env)


def test_elastic_flags_build_an_elastic_pool() -> None:
    config = parse("--min-actors", "0", "--max-actors", "3", "--downscale-delay", "5")
    pool = config.pool
    assert pool is not None and pool.elastic
    assert (pool.lowest, pool.highest, pool.downscale_delay_s) == (0, 3, 5.0)
    assert config.slots is None  # auto: follows the pool
    assert parse("--actors", "4", "--slots", "auto").slots is None
    fixed = parse("--actors", "4").pool
    assert fixed is not None and not fixed.elastic and fixed.lowest == fixed.highest == 4


def test_elastic_flags_that_contradict_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--max-actors"):
        parse("--min-actors", "1")
    with pytest.raises(ConfigError, match="either --actors"):
        parse("--actors", "2", "--max-actors", "3")
    with pytest.raises(ConfigError, match="max_actors"):
        PoolConfig(min_actors=4, max_actors=2)


# -- the dispatcher growing and shrinking ------------------------------------------------


class GatedBackend(FakeBackend):
    """Actors start only when ``room`` is set: until then they are pending."""

    def __init__(self) -> None:
        super().__init__()
        self.room = asyncio.Event()
        self.cancelled = 0

    async def start_actor(self) -> FakeActor:
        try:
            await self.room.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().start_actor()


async def test_a_batch_waits_for_an_actor_on_an_empty_elastic_pool() -> None:
    backend = GatedBackend()
    m, d = await started(backend, num_actors=0, elastic=True)
    run = asyncio.ensure_future(d.run("s", payloads(4)))
    await asyncio.sleep(0)  # ok: let the batch reach the pool
    assert d.batches == 1 and not run.done()
    m.grow(1)
    assert m.pending == 1
    backend.room.set()
    assert await run == [(p.upper(), None) for p in payloads(4)]
    assert m.pending == 0 and len(m.members()) == 1 and d.batches == 0


async def test_release_takes_pending_first_then_idle_never_busy() -> None:
    backend = GatedBackend()
    backend.room.set()
    m, d = await started(backend, num_actors=2, elastic=True)
    backend.room.clear()
    m.grow(1)
    await asyncio.sleep(0)  # ok: the pending start reaches the backend
    backend.release.clear()
    busy = asyncio.ensure_future(d.run("s", [b"wait"]))
    await backend.entered.wait()
    assert m.release(3) == 2  # the pending one and the idle one; not the busy one
    assert m.pending == 0 and len(m.members()) == 1
    backend.release.set()
    assert await busy == [(b"WAIT", None)]
    await asyncio.sleep(0)  # ok: the retirement task runs
    assert backend.cancelled == 1  # the pending start was cancelled (Ray: actor killed)
    assert any(session == "*" for _, session in backend.ended)  # its sessions ended
    assert m.release(1) == 1 and m.members() == []
    await m.close()
