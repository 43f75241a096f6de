"""What the bridge counts, and its Prometheus text form. No Ray, no gRPC.

Metric names and labels (also exported through Ray's metrics, see ``actor.py``):

| name | type | meaning |
|---|---|---|
| ``alpcrun_tasks_processed_total`` | counter | tasks answered with a result |
| ``alpcrun_tasks_failed_total`` | counter | tasks answered with an error (dead batches included) |
| ``alpcrun_batches_total`` | counter | batches answered |
| ``alpcrun_batches_dead_total`` | counter | batches answered ``dead`` |
| ``alpcrun_batches_in_flight`` | gauge | batches being processed now |
| ``alpcrun_batch_latency_seconds`` | histogram | receive-to-answer time per batch |
| ``alpcrun_results_dropped_total`` | counter | results whose stream was gone (re-delivered) |
| ``alpcrun_batches_undecodable_total`` | counter | task batches not decodable (unanswered) |
| ``alpcrun_shared_data_fetches_total`` | counter | GetSharedData calls to the node cache |
| ``alpcrun_shared_data_bytes_total`` | counter | bytes of shared data fetched |
| ``alpcrun_actor_restarts_total`` | counter | pool actors replaced after dying or hanging |
| ``alpcrun_sessions_bound`` | gauge | sessions this bridge serves now |
| ``alpcrun_workers_registered`` | gauge | slots registered with the queue manager |
| ``alpcrun_reconnects_total`` | counter | registrations retried after a failure |
| ``alpcrun_gpu_memory_used_bytes{actor}`` | gauge | per GPU actor, from NVML |
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass
class LatencyHistogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: int = 0
    sum_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=2048))

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += 1
        self.sum_s += seconds
        self.recent.append(seconds)

    def quantile(self, q: float) -> float | None:
        """Quantile over the most recent observations (None before the first)."""
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class BridgeStats:
    tasks_ok: int = 0
    tasks_failed: int = 0
    batches_done: int = 0
    batches_dead: int = 0
    batches_in_flight: int = 0
    results_dropped: int = 0
    batches_undecodable: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


_HELP = {
    "alpcrun_tasks_processed_total": "tasks answered with a result",
    "alpcrun_tasks_failed_total": "tasks answered with an error",
    "alpcrun_batches_total": "batches answered",
    "alpcrun_batches_dead_total": "batches answered dead",
    "alpcrun_results_dropped_total": "results not sendable",
    "alpcrun_batches_undecodable_total": "task batches that could not be decoded",
}


def stat_counters(stats: BridgeStats) -> dict[str, float]:
    """The counters kept in ``stats``, by metric name (one list for every exporter)."""
    return {
        "alpcrun_tasks_processed_total": float(stats.tasks_ok),
        "alpcrun_tasks_failed_total": float(stats.tasks_failed),
        "alpcrun_batches_total": float(stats.batches_done),
        "alpcrun_batches_dead_total": float(stats.batches_dead),
        "alpcrun_results_dropped_total": float(stats.results_dropped),
        "alpcrun_batches_undecodable_total": float(stats.batches_undecodable),
    }


def render_prometheus(
    stats: BridgeStats, gauges: Mapping[str, float], counters: Mapping[str, float],
    gpu_memory: Iterable[tuple[str, float]] = (),
) -> str:  # fmt: skip
    """Prometheus text exposition of the stats plus extra gauges and counters."""
    lines: list[str] = []

    def metric(name: str, kind: str, value: float, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value:g}")

    for name, value in stat_counters(stats).items():
        metric(name, "counter", value, _HELP.get(name, name.replace("_", " ")))
    metric("alpcrun_batches_in_flight", "gauge", stats.batches_in_flight, "batches in progress")
    for name, value in counters.items():
        metric(name, "counter", value, name.replace("_", " "))
    for name, value in gauges.items():
        metric(name, "gauge", value, name.replace("_", " "))
    h = stats.latency
    name = "alpcrun_batch_latency_seconds"
    lines.append(f"# HELP {name} receive-to-answer time per batch")
    lines.append(f"# TYPE {name} histogram")
    running = 0
    for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
        running += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f'{name}_bucket{{le="{le}"}} {running}')
    lines.append(f"{name}_sum {h.sum_s:g}")
    lines.append(f"{name}_count {h.total}")
    gpu = list(gpu_memory)
    if gpu:
        lines.append("# HELP alpcrun_gpu_memory_used_bytes GPU memory used, per GPU actor")
        lines.append("# TYPE alpcrun_gpu_memory_used_bytes gauge")
        lines.extend(f'alpcrun_gpu_memory_used_bytes{{actor="{a}"}} {v:g}' for a, v in gpu)
    return "\n".join(lines) + "\n"
