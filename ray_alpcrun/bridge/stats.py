"""What the bridge counts, and its Prometheus form: one ``prometheus_client``
registry per bridge (:class:`BridgeMetrics`). No Ray, no gRPC.

Which metrics the registry holds, and where each value comes from, is
:mod:`ray_alpcrun.bridge.figures`; every name is listed in ``docs/metrics.md``.

The batch latency histogram counts per bucket itself (plain integers on the
hot path) instead of wrapping ``prometheus_client.Histogram``: with a bridge on
every node the coordinator renders the sum of every bridge's buckets, which
needs the counts as data (:meth:`LatencyHistogram.snapshot`). Its buckets run
from 0.1 ms (a batch of no-op tasks over the direct path) to 60 s (a batch of
long GPU tasks).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
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
    60.0,
)

LATENCY_NAME = "alpcrun_batch_latency_seconds"
LATENCY_HELP = "receive-to-answer time per batch"
# Observations kept for the mirror into Ray's metrics (between two of its reads).
LATENCY_RECENT_MAX = 2048


# A histogram's figures: the count of each bucket (the last one: above the
# highest bound), and the sum of the observations.
LatencySnapshot = tuple[list[int], float]


class LatencyHistogram:
    """Receive-to-answer time per batch, counted per bucket of
    :data:`LATENCY_BUCKETS_S`, plus the latest observations for the mirror into
    Ray's metrics."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0
        self.total = 0
        self.recent: deque[float] = deque(maxlen=LATENCY_RECENT_MAX)

    def observe(self, seconds: float) -> None:
        # A bucket's bound is inclusive ("le"): bisect_left finds the first bound >= seconds.
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds
        self.total += 1
        self.recent.append(seconds)

    def snapshot(self) -> LatencySnapshot:
        """The counts per bucket and the sum, as plain data (a node bridge reports them)."""
        return list(self.counts), self.sum_s

    def since(self, seen: int) -> list[float]:
        """The observations made after the first ``seen`` of them; when more were
        made than are kept, the latest :data:`LATENCY_RECENT_MAX`."""
        new = self.total - seen
        if new <= 0:
            return []
        recent = list(self.recent)
        return recent[-min(new, len(recent)) :]


def latency_family(snapshots: Iterable[LatencySnapshot]) -> HistogramMetricFamily:
    """The Prometheus histogram of the sum of ``snapshots`` (bucket counts add up)."""
    counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
    sum_s = 0.0
    for bucket_counts, snapshot_sum in snapshots:
        if len(bucket_counts) != len(counts):
            continue  # another version's buckets: not comparable
        counts = [a + b for a, b in zip(counts, bucket_counts, strict=True)]
        sum_s += snapshot_sum
    cumulative, buckets = 0, []
    for bound, count in zip(
        [*map(floatToGoString, LATENCY_BUCKETS_S), "+Inf"], counts, strict=True
    ):
        cumulative += count
        buckets.append((bound, float(cumulative)))
    return HistogramMetricFamily(LATENCY_NAME, LATENCY_HELP, buckets=buckets, sum_value=sum_s)


@dataclass
class BridgeStats:
    """Plain counters, bumped on the hot path; read when scraped."""

    tasks_ok: int = 0
    tasks_failed: int = 0
    tasks_dead: int = 0  # in batches answered dead (counted in tasks_failed too)
    batches_done: int = 0
    batches_dead: int = 0
    batches_in_flight: int = 0
    results_dropped: int = 0
    batches_undecodable: int = 0
    batches_answered_again: int = 0  # delivered again, answered from the answer book
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    # The histograms of the node bridges (summed(): rendered with ``latency``).
    latency_elsewhere: list[LatencySnapshot] = field(default_factory=list)


# The counters a node bridge reports to its coordinator, summed there for /metrics.
STAT_FIELDS = (
    "tasks_ok",
    "tasks_failed",
    "tasks_dead",
    "batches_done",
    "batches_dead",
    "batches_in_flight",
    "results_dropped",
    "batches_undecodable",
    "batches_answered_again",
)
# Of those, the counters (batches_in_flight is a gauge): what an ended node
# bridge counted stays in the deployment's sums (NodeBridges.ended_counts).
COUNTER_FIELDS = tuple(name for name in STAT_FIELDS if name != "batches_in_flight")


def summed(
    own: BridgeStats,
    others: Iterable[dict[str, int]],
    latencies: Iterable[LatencySnapshot] = (),
) -> BridgeStats:
    """``own`` plus the counters of ``others``; the histogram stays own's (the
    Ray mirror reads its observations), with ``latencies`` beside it."""
    others = list(others)
    out = BridgeStats(latency=own.latency, latency_elsewhere=list(latencies))
    for name in STAT_FIELDS:
        total = getattr(own, name) + sum(int(o.get(name, 0)) for o in others)
        setattr(out, name, total)
    return out


Read = Callable[[], float]
Labels = tuple[str, ...]
ReadLabelled = Callable[[], Iterable[tuple[Labels | str, float]]]


class BridgeMetrics(Collector):
    """The bridge's metrics, in a registry of its own (two bridges in one process
    never share a figure). Each metric reads its value when scraped, so adding
    one is a line::

        metrics.gauge("alpcrun_pool_actors_alive", "actors alive", lambda: pool.alive)
    """

    def __init__(self, stats: Callable[[], BridgeStats]) -> None:
        self._stats = stats
        self._metrics: list[tuple[str, str, str, Read]] = []
        self._labelled: list[tuple[str, str, str, Labels, ReadLabelled]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        counters: list[tuple[str, str, Callable[[BridgeStats], int]]] = [
            ("alpcrun_tasks_processed_total", "tasks answered with a result", lambda s: s.tasks_ok),
            ("alpcrun_tasks_failed_total", "tasks answered with an error (dead ones included)",
             lambda s: s.tasks_failed),
            ("alpcrun_tasks_dead_total", "tasks of batches the bridge answered dead",
             lambda s: s.tasks_dead),
            ("alpcrun_batches_total", "batches answered", lambda s: s.batches_done),
            ("alpcrun_batches_dead_total", "batches answered dead", lambda s: s.batches_dead),
            ("alpcrun_results_dropped_total",
             "results whose stream was gone (the queue manager re-delivers)",
             lambda s: s.results_dropped),
            ("alpcrun_batches_undecodable_total", "task batches that could not be decoded",
             lambda s: s.batches_undecodable),
            ("alpcrun_batches_answered_again_total",
             "batches delivered again and answered from their computation kept here",
             lambda s: s.batches_answered_again),
        ]  # fmt: skip
        for name, help_text, field_of in counters:
            self.counter(name, help_text, self._of_stats(field_of))
        self.gauge("alpcrun_batches_in_flight", "batches being processed now",
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

    def labelled_gauge(
        self, name: str, help_text: str, labels: str | Labels, read: ReadLabelled
    ) -> None:
        """A gauge with labels; ``read()`` yields ``(label values, value)`` pairs
        (one label: its value may be a plain string)."""
        self._labelled.append((name, help_text, "gauge", _names(labels), read))

    def labelled_counter(
        self, name: str, help_text: str, labels: str | Labels, read: ReadLabelled
    ) -> None:
        """A counter (``name`` ends in ``_total``) with labels, as :meth:`labelled_gauge`."""
        self._labelled.append((name, help_text, "counter", _names(labels), read))

    def collect(self) -> Iterator[Metric]:
        for name, help_text, kind, read in self._metrics:
            if kind == "counter":
                yield CounterMetricFamily(name, help_text, value=read())
            else:
                yield GaugeMetricFamily(name, help_text, value=read())
        stats = self._stats()
        yield latency_family([stats.latency.snapshot(), *stats.latency_elsewhere])
        for name, help_text, kind, labels, read_labelled in self._labelled:
            family: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(name, help_text, labels=labels)
            else:
                family = GaugeMetricFamily(name, help_text, labels=labels)
            for key, value in read_labelled():
                family.add_metric([key] if isinstance(key, str) else list(key), value)
            yield family

    def values(self) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
        """Every counter and gauge sample as (kind, name, help, labels, value), for mirrors."""
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge"):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                yield (
                    family.type,
                    sample.name,
                    family.documentation,
                    dict(sample.labels),
                    (sample.value),
                )

    def render(self) -> str:
        """The Prometheus text exposition."""
        return generate_latest(self.registry).decode()


def _names(labels: str | Labels) -> Labels:
    return (labels,) if isinstance(labels, str) else labels
