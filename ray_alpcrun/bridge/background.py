"""The coordinator bridge's background loops: logical workers that follow the
elastic pool, the reading of the actors' counters, and the mirror of the
bridge's metrics into Ray's. Split from :mod:`ray_alpcrun.bridge.actor`, whose
:class:`~ray_alpcrun.bridge.actor.Bridge` starts them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray_alpcrun.bridge.debugging import trim_heap
from ray_alpcrun.bridge.stats import LATENCY_BUCKETS_S, LATENCY_HELP, LATENCY_NAME

log = logging.getLogger(__name__)

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
        LATENCY_NAME, description=LATENCY_HELP, boundaries=list(LATENCY_BUCKETS_S)
    )
    while True:
        await bridge._refresh_gpu_memory()
        for kind, name, help_text, labels, value in bridge.metrics.values():
            if name not in mirrors:
                make = metrics.Counter if kind == "counter" else metrics.Gauge
                mirrors[name] = make(name, description=help_text, tag_keys=tuple(labels))
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


async def _read_actor_counters(bridge: Bridge, period_s: float = 2.0) -> None:
    """Read the counters the pool's actors keep (their shared-data decodes) for
    ``/metrics``, every ``period_s``: a scrape itself never calls an actor."""
    while True:
        pool = bridge.pool
        if pool is not None:
            try:
                status = await pool.status(max_age_s=bridge.status_max_age_s)
            except Exception as exc:  # e.g. the pool closing: read again next round
                log.debug("actor counters not read: %s", exc)
            else:
                bridge.decodes.update(status.get("actors", []))
        await asyncio.sleep(period_s)  # ok: sampling period


async def _trim_heap(period_s: float = 30.0) -> None:
    """Hand the C heap's freed memory back every ``period_s`` (:func:`trim_heap`),
    off the event loop: a bridge lives as long as its deployment."""
    while True:
        await asyncio.sleep(period_s)  # ok: trimming period
        await asyncio.to_thread(trim_heap)
