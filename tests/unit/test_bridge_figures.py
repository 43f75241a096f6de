"""What ``/metrics`` shows of a deployment with node bridges (``bridge/figures.py``),
from a Bridge that is not running and a fake of its node bridges: the series
without labels are the sums, the per-node ones carry the coordinator's node
and every live node bridge's, the latency histogram adds up the buckets."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from ray_alpcrun.bridge.actor import Bridge
from ray_alpcrun.bridge.figures import WORKER_FIELDS, ActorTally
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import BridgeMetrics, BridgeStats, LatencyHistogram, summed
from ray_alpcrun.config import PoolConfig


class FakeNodes:
    """What the coordinator's figures read of NodeBridges: describe(), summed()
    and ended_counts() (what ended node bridges counted, per node name)."""

    def __init__(
        self,
        entries: list[dict[str, Any]],
        latency: LatencyHistogram,
        ended: dict[str, dict[str, int]] | None = None,
    ) -> None:
        self.entries = entries
        self.latency = latency
        self.ended = ended or {}

    def describe(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def summed(self, own: BridgeStats) -> BridgeStats:
        live = [e for e in self.entries if not e["dead"]]
        return summed(own, live + list(self.ended.values()), [self.latency.snapshot()])

    def ended_counts(self) -> dict[str, dict[str, int]]:
        return self.ended


@pytest.fixture
def coordinator() -> Iterator[Bridge]:
    logger = logging.getLogger("ray_alpcrun")
    saved = (list(logger.handlers), logger.level, logger.propagate, logging.lastResort)
    settings = WorkerSettings("127.0.0.1:1", "127.0.0.1:2", "k", "ghpc.v1", "head", "p", 1)
    bridge = Bridge("tests.support.handlers:echo", PoolConfig(num_actors=2), settings)
    logger.handlers[:], logger.level, logger.propagate, logging.lastResort = saved
    yield bridge


def node_entry(node: str | None, dead: bool = False, **figures: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "node": node, "node_id": f"id-{node}", "dead": dead, "registered": 2, "batches": 1,
        "ready": True, "slots_in_flight": [0, 3], "tasks_ok": 7, "tasks_failed": 1,
        **dict.fromkeys(WORKER_FIELDS, 0),
    }  # fmt: skip
    entry.update(figures)
    return entry


def test_node_bridges_are_summed_and_labelled(coordinator: Bridge) -> None:
    latency = LatencyHistogram()
    latency.observe(0.0002)
    coordinator._idle_stats.tasks_ok = 5
    coordinator.nodes = FakeNodes(  # type: ignore[assignment]
        [
            node_entry("gpu-1", shared_fetches=4, shared_bytes=100, shared_level_max=3),
            node_entry("gpu-2", dead=True, tasks_ok=1000),
            # started, not polled yet: no name and no figures
            node_entry(None, registered=0, tasks_ok=0, tasks_failed=0, slots_in_flight=[]),
        ],
        latency,
        ended={"gpu-2": {"tasks_ok": 1000}},  # what the dead one counted, kept
    )
    text = coordinator.metrics.render()
    assert "alpcrun_tasks_processed_total 1012.0" in text  # 5 own + 7 + 1000 (ended)
    assert "alpcrun_shared_data_fetches_total 4.0" in text
    assert "alpcrun_shared_data_bytes_total 100.0" in text
    assert "alpcrun_shared_data_level_max 3.0" in text
    assert "alpcrun_workers_registered 2.0" in text
    assert 'alpcrun_node_bridge_tasks_processed_total{node="head"} 5.0' in text
    assert 'alpcrun_node_bridge_tasks_processed_total{node="gpu-1"} 7.0' in text
    assert 'alpcrun_node_bridge_ready{node="head"} 0.0' in text
    assert 'alpcrun_node_bridge_ready{node="gpu-1"} 1.0' in text
    assert 'alpcrun_worker_batches_in_flight{node="gpu-1",slot="1"} 3.0' in text
    # The dead bridge: no gauges any more; its counters carry on under its node.
    assert 'alpcrun_node_bridge_tasks_processed_total{node="gpu-2"} 1000.0' in text
    assert 'alpcrun_node_bridge_ready{node="gpu-2"}' not in text
    assert 'node="id-None"' not in text
    assert 'alpcrun_batch_latency_seconds_bucket{le="0.00025"} 1.0' in text


def test_a_single_bridge_has_its_per_node_series(coordinator: Bridge) -> None:
    text = coordinator.metrics.render()
    assert 'alpcrun_node_bridge_workers_registered{node="head"} 0.0' in text
    assert "alpcrun_worker_batches_in_flight" in text  # no slot before the worker runs


def test_histogram_sums_node_bridges_buckets() -> None:
    own, node = BridgeStats(), BridgeStats()
    own.latency.observe(0.00005)  # below the first bound
    node.latency.observe(0.0001)  # exactly a bound: counted in it ("le")
    node.latency.observe(90.0)  # above the last: +Inf only
    metrics = BridgeMetrics(lambda: summed(own, [], [node.latency.snapshot()]))
    text = metrics.render()
    assert 'alpcrun_batch_latency_seconds_bucket{le="0.0001"} 2.0' in text
    assert 'alpcrun_batch_latency_seconds_bucket{le="60.0"} 2.0' in text
    assert 'alpcrun_batch_latency_seconds_bucket{le="+Inf"} 3.0' in text
    assert "alpcrun_batch_latency_seconds_count 3.0" in text


def test_actor_tally_never_goes_down() -> None:
    tally = ActorTally("shared_decodes")

    def actor(index: int, pid: int, decodes: int) -> dict[str, Any]:
        return {"actor": index, "pid": pid, "node_id": "n", "shared_decodes": decodes}

    tally.update([actor(0, 10, 2), actor(1, 11, 3)])
    assert tally.total == 5
    tally.update([actor(0, 10, 2), {"actor": 1, "error": "no answer within 5 s"}])
    assert tally.total == 5  # no answer: what it said last stands
    tally.update([actor(0, 10, 4), actor(1, 12, 1)])  # 1 replaced (new pid)
    assert tally.total == 4 + 3 + 1
    tally.update([actor(1, 12, 1)])  # 0 released
    assert tally.total == 8
