"""The bridge as a Ray actor: the gRPC worker (``worker.py``) in front of an
:class:`~ray_alpcrun.pool.ActorPool`.

The actor asks for no CPU (``num_cpus=0``) so it never starves the pool, and
is async: its event loop carries the gRPC streams while the pool's actors compute.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from dataclasses import replace
from typing import Any

from ray_alpcrun import errors
from ray_alpcrun.bridge.stats import (
    LATENCY_BUCKETS_S,
    BridgeStats,
    render_prometheus,
    stat_counters,
)
from ray_alpcrun.bridge.worker import BridgeWorker, WorkerSettings
from ray_alpcrun.config import PoolConfig
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.health import HealthServer
from ray_alpcrun.logs import fields, setup_logging
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)


class PoolProcessor:
    """Adapts the actor pool to the bridge's ``Processor`` protocol."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        # In a thread: putting 256 MB would stall every stream for ~100 ms.
        return await self.pool.aput_shared(session_id, level, payload)

    async def process(
        self, session_id: str, payloads: list[bytes], shared: Any | None
    ) -> list[Outcome]:
        outcomes: list[Outcome] = await self.pool.run(session_id, payloads, shared=shared)
        return outcomes

    async def end_session(self, session_id: str) -> None:
        await self.pool.end_session(session_id)


class Bridge:
    """Runs inside the Ray actor (see :func:`bridge_actor_class`)."""

    def __init__(
        self,
        handler: HandlerSpec,
        pool_config: PoolConfig,
        settings: WorkerSettings,
        log_level: str = "info",
        log_json: bool = False,
        health_port: int | None = None,
        health_host: str = "0.0.0.0",
    ) -> None:
        setup_logging(log_level, log_json)
        self.handler = handler
        # The pool's actors log as the bridge does (their lines reach the driver).
        self.pool_config = replace(pool_config, log_level=log_level, log_json=log_json)
        self.settings = settings
        self.health_port = health_port
        self.health_host = health_host
        self.health: HealthServer | None = None
        self.draining = False
        self.pool: Any = None
        self.worker: BridgeWorker | None = None
        self._started = asyncio.Event()
        self._stop_requested = False

    async def run(self) -> tuple[int, str]:
        """Serve until stopped; returns (exit code, reason) — never raises for config errors."""
        from ray_alpcrun.pool import ActorPool

        exporter: asyncio.Task[None] | None = None
        try:
            if self.health_port is not None:
                self.health = HealthServer(
                    self._live, self._ready, self.metrics_text, self.status,
                    host=self.health_host, port=self.health_port,
                )  # fmt: skip
                try:
                    self.health_port = await self.health.start()
                except OSError as exc:
                    raise errors.ConfigError(
                        f"cannot serve health on {self.health_host}:{self.health_port}: "
                        f"{exc.strerror}; choose another --health-port"
                    ) from exc
            self.pool = ActorPool(self.handler, self.pool_config)
            worker = BridgeWorker(self.settings, PoolProcessor(self.pool))
            # A wrong key, CA or proto package fails in the preflight within a
            # second, without waiting for the actors to start.
            starting = asyncio.ensure_future(self.pool.start())
            try:
                await worker.preflight()
                await starting
            finally:
                starting.cancel()
            # Full collections would rescan Ray's and gRPC's ~100k long-lived objects
            # (tens of ms, a stall of every stream) as batches churn out garbage.
            gc.freeze()
            self.worker = worker
            self._started.set()
            log.info(
                "bridge serving",
                extra=fields(
                    queue=self.settings.queue_address,
                    cache=self.settings.cache_address,
                    slots=self.settings.slots,
                    actors=self.pool_config.num_actors,
                    package=self.settings.proto_package or "(none)",
                ),
            )
            if self._stop_requested:
                return errors.EXIT_OK, ""
            exporter = asyncio.create_task(_export_ray_metrics(self))
            await self.worker.run()
            return errors.EXIT_OK, ""
        except errors.FatalError as exc:
            return exc.exit_code, exc.reason
        except errors.HandlerError as exc:
            return errors.EXIT_HANDLER, f"handler: {exc}"
        except errors.ConfigError as exc:
            return errors.EXIT_CONFIG, str(exc)
        finally:
            self._started.set()
            if exporter is not None:
                exporter.cancel()
            if self.pool is not None:
                await self.pool.close()
            # Closed last: a Kubernetes preStop hook waits for this port to close.
            if self.health is not None:
                await self.health.stop()

    async def stop(self, drain: bool = True) -> None:
        self._stop_requested = True
        self.draining = True
        await self._started.wait()
        if self.worker is not None:
            await self.worker.stop(drain=drain)

    async def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """True once every slot is registered with the queue manager."""
        await asyncio.wait_for(self._started.wait(), timeout_s)
        if self.worker is None:
            return False
        await self.worker.wait_registered(timeout_s)
        return True

    async def _live(self) -> tuple[bool, str]:
        # Answering at all proves the event loop turns.
        return True, "draining" if self.draining else "serving"

    async def _ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.worker is None or self.pool is None:
            return False, "starting"
        if not self.worker.ready:
            return False, "not registered with the queue manager"
        live = int((await self.pool.status()).get("live", 0))
        if live < 1:
            return False, "no live actor in the pool"
        return True, f"{live} actor(s), {len(self.worker.slots)} slot(s) registered"

    async def metrics_text(self) -> str:
        w = self.worker
        stats = w.stats if w is not None else BridgeStats()
        counters, gauges, gpu = await self._metric_values()
        return render_prometheus(stats, gauges, counters, gpu)

    async def _metric_values(
        self,
    ) -> tuple[dict[str, float], dict[str, float], list[tuple[str, float]]]:
        w = self.worker
        shared = w.link.shared if w is not None else None
        counters = {
            "alpcrun_shared_data_fetches_total": float(shared.fetches if shared else 0),
            "alpcrun_shared_data_bytes_total": float(shared.fetched_bytes if shared else 0),
            "alpcrun_actor_restarts_total": float(self.pool.restarts if self.pool else 0),
            "alpcrun_reconnects_total": float(w.reconnects if w else 0),
        }
        gauges = {
            "alpcrun_sessions_bound": float(len(w.bound_sessions) if w else 0),
            "alpcrun_workers_registered": float(
                sum(s.registered.is_set() for s in w.slots) if w else 0
            ),
        }
        gpu: list[tuple[str, float]] = []
        if self.pool is not None:
            for actor in (await self.pool.status()).get("actors", []):
                device = actor.get("device") or {}
                if "memory_used_bytes" in device:
                    gpu.append((str(actor.get("slot")), float(device["memory_used_bytes"])))
        return counters, gauges, gpu

    async def status(self) -> dict[str, Any]:
        w = self.worker
        out: dict[str, Any] = {
            "started": self._started.is_set(),
            "ready": bool(w and w.ready),
            "draining": self.draining,
            "health_port": self.health_port,
            "pid": os.getpid(),  # for memory sampling (benchmarks/soak.py)
        }
        if w is not None:
            s = w.stats
            out.update(
                slots=[
                    {
                        "worker_id": slot.worker_id,
                        "registered": slot.registered.is_set(),
                        "session": slot.session.session_id if slot.session else None,
                        "in_flight": slot.session.in_flight if slot.session else 0,
                    }
                    for slot in w.slots
                ],
                sessions=w.bound_sessions,
                tasks_ok=s.tasks_ok,
                tasks_failed=s.tasks_failed,
                batches_done=s.batches_done,
                batches_dead=s.batches_dead,
                batches_in_flight=s.batches_in_flight,
                results_dropped=s.results_dropped,
                shared_fetches=w.link.shared.fetches,
                reconnects=w.reconnects,
            )
        if self.pool is not None:
            out["actor_restarts"] = self.pool.restarts
            out["actors"] = await self.pool.status()
        return out


async def _export_ray_metrics(bridge: Bridge, period_s: float = 5.0) -> None:
    """Mirror the bridge's figures into Ray's metrics (Prometheus via Ray's agent)."""
    try:
        from ray.util import metrics
    except ImportError:  # pragma: no cover - ray without metrics support
        return
    counters: dict[str, Any] = {}
    gauges: dict[str, Any] = {}
    last: dict[str, float] = {}
    seen_batches = 0
    gpu_memory = metrics.Gauge(
        "alpcrun_gpu_memory_used_bytes",
        description="GPU memory used, per GPU actor",
        tag_keys=("actor",),
    )
    latency = metrics.Histogram(
        "alpcrun_batch_latency_seconds",
        description="receive-to-answer time per batch",
        boundaries=list(LATENCY_BUCKETS_S),
    )
    while True:
        w = bridge.worker
        if w is not None:
            s = w.stats
            extra_counters, extra_gauges, gpu = await bridge._metric_values()
            for actor, used in gpu:
                gpu_memory.set(used, tags={"actor": actor})
            totals = {**stat_counters(s), **extra_counters}
            for name, value in totals.items():
                if name not in counters:
                    counters[name] = metrics.Counter(name, description=name.replace("_", " "))
                delta = value - last.get(name, 0.0)
                if delta > 0:
                    counters[name].inc(delta)
                last[name] = value
            for name, value in {
                **extra_gauges,
                "alpcrun_batches_in_flight": float(s.batches_in_flight),
            }.items():
                if name not in gauges:
                    gauges[name] = metrics.Gauge(name, description=name.replace("_", " "))
                gauges[name].set(value)
            recent = list(s.latency.recent)
            new = s.latency.total - seen_batches
            for value in recent[-new:] if 0 < new <= len(recent) else []:
                latency.observe(value)
            seen_batches = s.latency.total
        await asyncio.sleep(period_s)


def bridge_actor_class() -> Any:
    """The Ray actor class for :class:`Bridge` (imports Ray on first use)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=1000)(Bridge)
