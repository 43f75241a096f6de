"""The mirror of the bridge's registry into Ray's metrics (``bridge.actor``),
against fake Ray metric classes and a fake bridge: no Ray cluster."""

from __future__ import annotations

from typing import Any, cast

import pytest
from ray.util import metrics as ray_metrics

from ray_alpcrun.bridge.actor import Bridge, _export_ray_metrics
from ray_alpcrun.bridge.stats import LATENCY_RECENT_MAX, BridgeMetrics, BridgeStats

pytestmark = pytest.mark.timeout(30)


class _Rounds(Exception):
    """Ends the exporter's loop after the rounds a test asked for."""


class _FakeHistogram:
    observed: list[float] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _FakeHistogram.observed = []

    def observe(self, value: float) -> None:
        _FakeHistogram.observed.append(value)


class _FakeMetric:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def inc(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set(self, *args: Any, **kwargs: Any) -> None:
        pass


class _FakeBridge:
    """What the exporter reads of a bridge; ``plan[i]`` batches finish before round i."""

    def __init__(self, plan: list[int]) -> None:
        self.stats = BridgeStats()
        self.metrics = BridgeMetrics(self._stats)
        self.plan = list(plan)
        self.latencies: list[float] = []

    def _stats(self) -> BridgeStats:
        return self.stats

    async def _refresh_gpu_memory(self) -> None:  # called once at the start of each round
        if not self.plan:
            raise _Rounds
        for _ in range(self.plan.pop(0)):
            value = float(len(self.latencies))
            self.latencies.append(value)
            self.stats.latency.observe(value)


@pytest.fixture(autouse=True)
def _fake_ray_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_metrics, "Histogram", _FakeHistogram)
    monkeypatch.setattr(ray_metrics, "Counter", _FakeMetric)
    monkeypatch.setattr(ray_metrics, "Gauge", _FakeMetric)


async def _export(bridge: _FakeBridge) -> list[float]:
    with pytest.raises(_Rounds):
        await _export_ray_metrics(cast(Bridge, bridge), period_s=0)
    return _FakeHistogram.observed


async def test_each_batch_is_mirrored_once() -> None:
    bridge = _FakeBridge([3, 0, 5])
    assert await _export(bridge) == bridge.latencies


async def test_a_busy_period_mirrors_its_latest_batches() -> None:
    # Issue 18 item 11: more batches than are kept in one period recorded nothing.
    bridge = _FakeBridge([10, LATENCY_RECENT_MAX + 500, 7])
    observed = await _export(bridge)
    first, busy = bridge.latencies[:10], bridge.latencies[10 : 10 + LATENCY_RECENT_MAX + 500]
    assert observed == first + busy[-LATENCY_RECENT_MAX:] + bridge.latencies[-7:]
