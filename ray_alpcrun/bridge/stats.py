"""What the bridge counts, and its Prometheus form: one ``prometheus_client``
registry per bridge (:class:`BridgeMetrics`). No Ray, no gRPC.

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

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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

LATENCY_NAME = "alpcrun_batch_latency_seconds"
# Observations kept for the mirror into Ray's metrics (between two of its reads).
LATENCY_RECENT_MAX = 2048


class LatencyHistogram:
    """Receive-to-answer time per batch: a real ``prometheus_client`` histogram
    (registered by :class:`BridgeMetrics`), plus the latest observations for the
    mirror into Ray's metrics."""

    def __init__(self) -> None:
        # registry=None: the bridge's registry reaches it through the current stats.
        self.histogram = Histogram(
            LATENCY_NAME, "receive-to-answer time per batch", buckets=LATENCY_BUCKETS_S,
            registry=None,
        )  # fmt: skip
        self.total = 0
        self.recent: deque[float] = deque(maxlen=LATENCY_RECENT_MAX)

    def observe(self, seconds: float) -> None:
        self.histogram.observe(seconds)
        self.total += 1
        self.recent.append(seconds)

    def since(self, seen: int) -> list[float]:
        """The observations made after the first ``seen`` of them; when more were
        made than are kept, the latest :data:`LATENCY_RECENT_MAX`."""
        new = self.total - seen
        if new <= 0:
            return []
        recent = list(self.recent)
        return recent[-min(new, len(recent)) :]


@dataclass
class BridgeStats:
    """Plain counters, bumped on the hot path; read when scraped."""

    tasks_ok: int = 0
    tasks_failed: int = 0
    batches_done: int = 0
    batches_dead: int = 0
    batches_in_flight: int = 0
    results_dropped: int = 0
    batches_undecodable: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


# The counters a node bridge reports to its coordinator, summed there for /metrics.
STAT_FIELDS = (
    "tasks_ok",
    "tasks_failed",
    "batches_done",
    "batches_dead",
    "batches_in_flight",
    "results_dropped",
    "batches_undecodable",
)


def summed(own: BridgeStats, others: Iterable[dict[str, int]]) -> BridgeStats:
    """``own`` plus the counters of ``others`` (the latency histogram stays own's)."""
    out = BridgeStats(latency=own.latency)
    for name in STAT_FIELDS:
        total = getattr(own, name) + sum(int(o.get(name, 0)) for o in others)
        setattr(out, name, total)
    return out


Read = Callable[[], float]
ReadLabelled = Callable[[], Iterable[tuple[str, float]]]


class BridgeMetrics(Collector):
    """The bridge's metrics, in a registry of its own (two bridges in one process
    never share a figure). Each metric reads its value when scraped, so adding
    one is a line::

        metrics.gauge("alpcrun_pool_actors_alive", "actors alive", lambda: pool.alive)
    """

    def __init__(self, stats: Callable[[], BridgeStats]) -> None:
        self._stats = stats
        self._metrics: list[tuple[str, str, str, Read]] = []
        self._labelled: list[tuple[str, str, str, ReadLabelled]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        counters: list[tuple[str, str, Callable[[BridgeStats], int]]] = [
            ("alpcrun_tasks_processed_total", "tasks answered with a result", lambda s: s.tasks_ok),
            ("alpcrun_tasks_failed_total", "tasks answered with an error",
             lambda s: s.tasks_failed),
            ("alpcrun_batches_total", "batches answered", lambda s: s.batches_done),
            ("alpcrun_batches_dead_total", "batches answered dead", lambda s: s.batches_dead),
            ("alpcrun_results_dropped_total", "results not sendable", lambda s: s.results_dropped),
            ("alpcrun_batches_undecodable_total", "task batches that could not be decoded",
             lambda s: s.batches_undecodable),
        ]  # fmt: skip
        for name, help_text, field_of in counters:
            self.counter(name, help_text, self._of_stats(field_of))
        self.gauge("alpcrun_batches_in_flight", "batches in progress",
                   lambda: float(self._stats().batches_in_flight))  # fmt: skip
        self.registry.register(self)

    def _of_stats(self, field_of: Callable[[BridgeStats], int]) -> Read:
        return lambda: float(field_of(self._stats()))

    def counter(self, name: str, help_text: str, read: Read) -> None:
        """A counter (``name`` ends in ``_total``) whose value ``read()`` returns."""
        self._metrics.append((name, help_text, "counter", read))

    def gauge(self, name: str, help_text: str, read: Read) -> None:
        """A gauge whose value ``read()`` returns."""
        self._metrics.append((name, help_text, "gauge", read))

    def labelled_gauge(self, name: str, help_text: str, label: str, read: ReadLabelled) -> None:
        """A gauge with one label; ``read()`` yields ``(label value, value)`` pairs."""
        self._labelled.append((name, help_text, label, read))

    def collect(self) -> Iterator[Metric]:
        for name, help_text, kind, read in self._metrics:
            if kind == "counter":
                yield CounterMetricFamily(name, help_text, value=read())
            else:
                yield GaugeMetricFamily(name, help_text, value=read())
        yield from self._stats().latency.histogram.collect()
        for name, help_text, label, read_labelled in self._labelled:
            family = GaugeMetricFamily(name, help_text, labels=[label])
            for key, value in read_labelled():
                family.add_metric([key], value)
            yield family

    def values(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """Every counter and gauge sample as (kind, name, labels, value), for mirrors."""
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                yield family.type, sample.name, dict(sample.labels), sample.value

    def render(self) -> str:
        """The Prometheus text exposition."""
        return generate_latest(self.registry).decode()
