"""The coordinator bridge's background loops: logical workers that follow the
elastic pool, and the mirror of the bridge's metrics into Ray's. Split from
:mod:`ray_alpcrun.bridge.actor`, whose :class:`~ray_alpcrun.bridge.actor.Bridge`
starts them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray_alpcrun.bridge.stats import LATENCY_BUCKETS_S, LATENCY_NAME, BridgeMetrics

# The Bridge, untyped here: this module must not import the one that imports it.
Bridge = Any


async def _follow_pool(bridge: Bridge, period_s: float = 0.25) -> None:
    """Keep the registered logical workers at :meth:`Bridge.wanted_slots`."""
    while True:
        bridge.follow_slots()
        await asyncio.sleep(period_s)  # ok: sampling period


async def _export_ray_metrics(bridge: Bridge, period_s: float = 5.0) -> None:
    """Mirror the bridge's registry into Ray's metrics (Prometheus via Ray's agent)."""
    from ray.util import metrics

    mirrors: dict[str, Any] = {}
    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    seen_batches = 0
    latency = metrics.Histogram(
        LATENCY_NAME,
        description="receive-to-answer time per batch",
        boundaries=list(LATENCY_BUCKETS_S),
    )
    while True:
        await bridge._refresh_gpu_memory()
        for kind, name, labels, value in bridge.metrics.values():
            if name not in mirrors:
                make = metrics.Counter if kind == "counter" else metrics.Gauge
                mirrors[name] = make(
                    name, description=name.replace("_", " "), tag_keys=tuple(labels)
                )
            key = (name, tuple(sorted(labels.items())))
            if kind == "counter":
                delta = value - last.get(key, 0.0)
                if delta > 0:
                    mirrors[name].inc(delta, tags=labels or None)
                last[key] = value
            else:
                mirrors[name].set(value, tags=labels or None)
        h = bridge._stats().latency
        for value in h.since(seen_batches):
            latency.observe(value)
        seen_batches = h.total
        await asyncio.sleep(period_s)


# (scale_status key, metric name, help) of the elastic pool's gauges.
_SCALE_GAUGES = (
    ("pending", "alpcrun_pool_actors_pending", "pool actors requested and not yet placed"),
    ("target", "alpcrun_pool_actors_target", "pool actors the scaler wants now"),
    ("min_actors", "alpcrun_pool_actors_min", "lower bound of the pool (--min-actors)"),
    ("max_actors", "alpcrun_pool_actors_max", "upper bound of the pool (--max-actors)"),
    ("batches", "alpcrun_pool_batches", "batches held by the pool (running or waiting)"),
)


def make_metrics(bridge: Bridge) -> BridgeMetrics:
    """The bridge's registry: the counters of its stats, and the pool's figures."""
    m = BridgeMetrics(bridge._stats)
    of = _of_worker(bridge)
    m.counter(
        "alpcrun_shared_data_fetches_total",
        "GetSharedData calls to the node cache",
        of(lambda w: w.link.shared.fetches),
    )
    m.counter(
        "alpcrun_shared_data_bytes_total",
        "bytes of shared data fetched",
        of(lambda w: w.link.shared.fetched_bytes),
    )
    m.counter(
        "alpcrun_actor_restarts_total",
        "pool actors replaced after dying or hanging",
        lambda: float(bridge.pool.restarts if bridge.pool else 0),
    )
    m.counter(
        "alpcrun_reconnects_total",
        "registrations retried after a failure",
        of(lambda w: w.reconnects),
    )
    m.gauge(
        "alpcrun_sessions_bound",
        "sessions this bridge serves now",
        of(lambda w: len(w.bound_sessions)),
    )
    m.gauge(
        "alpcrun_workers_registered",
        "slots registered with the queue manager",
        of(lambda w: sum(s.registered.is_set() for s in w.slots)),
    )
    # The elastic pool's figures (actors alive, pending and wanted, the bounds).
    m.gauge("alpcrun_pool_actors_alive", "pool actors alive",
            lambda: float(bridge.pool.live if bridge.pool else 0))  # fmt: skip
    for key, name, help_text in _SCALE_GAUGES:
        m.gauge(name, help_text, _of_scale(bridge, key))
    m.counter("alpcrun_pool_actors_released_total", "actors released by downscaling",
              _of_scale(bridge, "released"))  # fmt: skip
    # Per node bridge (--bridges per-node), labelled by the node's name.
    for key, name, help_text in _NODE_GAUGES:
        m.labelled_gauge(name, help_text, "node", _of_nodes(bridge, key))
    m.labelled_gauge(
        "alpcrun_gpu_memory_used_bytes",
        "GPU memory used, per GPU actor",
        "actor",
        lambda: bridge._gpu_memory,
    )
    return m  # fmt: skip


# (node bridge field, metric name, help) of the per-node gauges.
_NODE_GAUGES = (
    (
        "registered",
        "alpcrun_node_bridge_workers_registered",
        "logical workers a node bridge registered",
    ),
    ("batches", "alpcrun_node_bridge_batches", "batches a node bridge holds (running or waiting)"),
    (
        "tasks_ok",
        "alpcrun_node_bridge_tasks_processed",
        "tasks a node bridge answered with a result",
    ),
    (
        "tasks_failed",
        "alpcrun_node_bridge_tasks_failed",
        "tasks a node bridge answered with an error",
    ),
    ("ready", "alpcrun_node_bridge_ready", "1 while a node bridge takes work"),
)


def _of_nodes(bridge: Bridge, key: str) -> Callable[[], list[tuple[str, float]]]:
    """One value per live node bridge, labelled by its node (none without node bridges)."""

    def read() -> list[tuple[str, float]]:
        nodes = bridge.nodes
        if nodes is None:
            return []
        described = [n for n in nodes.describe() if not n["dead"]]
        return [(str(n["node"] or n["node_id"]), float(n.get(key) or 0)) for n in described]

    return read


def _of_scale(bridge: Bridge, key: str) -> Callable[[], float]:
    """A figure of the pool's scaling state, read at scrape time."""
    return lambda: float(bridge.pool.scale_status()[key]) if bridge.pool is not None else 0.0


def _of_worker(bridge: Bridge) -> Callable[[Callable[[Any], float]], Callable[[], float]]:
    """Metrics read from the worker at scrape time (0 before it exists)."""

    def of(read: Callable[[Any], float]) -> Callable[[], float]:
        return lambda: float(read(bridge.worker)) if bridge.worker is not None else 0.0

    return of
