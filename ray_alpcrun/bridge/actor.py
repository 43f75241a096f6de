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
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ray_alpcrun import errors
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import LATENCY_BUCKETS_S, LATENCY_NAME, BridgeMetrics, BridgeStats
from ray_alpcrun.bridge.worker import BridgeWorker
from ray_alpcrun.config import PoolConfig
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.health import HealthServer
from ray_alpcrun.logs import fields, log_task_failure, setup_logging
from ray_alpcrun.pool.membership import UNAVAILABLE
from ray_alpcrun.runtime import Outcome

if TYPE_CHECKING:
    from ray_alpcrun.pool.actor_pool import ActorPool
    from ray_alpcrun.pool.membership import Availability
    from ray_alpcrun.pool.pool_actor import SharedRef

log = logging.getLogger(__name__)

NotReady = Callable[[], "str | None"]
"""A readiness check: why the bridge does not take work now, or None."""

# The pool's status is read from the actors at most once per this period: a
# flood of /status or /metrics requests costs them one round of calls.
STATUS_MAX_AGE_S = 1.0


class PoolProcessor:
    """Adapts the actor pool to the bridge's ``Processor`` protocol."""

    def __init__(self, pool: ActorPool) -> None:
        self.pool = pool

    async def share(self, session_id: str, level: int | None, payload: bytes) -> SharedRef:
        # In a thread: putting 256 MB would stall every stream for ~100 ms.
        return await self.pool.aput_shared(session_id, level, payload)

    async def process(
        self, session_id: str, payloads: list[bytes], shared: SharedRef | None
    ) -> list[Outcome]:
        outcomes: list[Outcome] = await self.pool.run(session_id, payloads, shared=shared)
        return outcomes

    async def end_session(self, session_id: str) -> None:
        await self.pool.end_session(session_id)


# (scale_status key, metric name, help) of the elastic pool's gauges.
_SCALE_GAUGES = (
    ("pending", "alpcrun_pool_actors_pending", "pool actors requested and not yet placed"),
    ("target", "alpcrun_pool_actors_target", "pool actors the scaler wants now"),
    ("min_actors", "alpcrun_pool_actors_min", "lower bound of the pool (--min-actors)"),
    ("max_actors", "alpcrun_pool_actors_max", "upper bound of the pool (--max-actors)"),
    ("batches", "alpcrun_pool_batches", "batches held by the pool (running or waiting)"),
)


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
        auto_slots: bool = False,
    ) -> None:
        setup_logging(log_level, log_json)
        # Logical workers follow the elastic pool (--slots auto, see ray_alpcrun.pool.scaling).
        self.auto_slots = auto_slots and pool_config.elastic
        self.handler = handler
        # The pool's actors log as the bridge does (their lines reach the driver).
        self.pool_config = replace(pool_config, log_level=log_level, log_json=log_json)
        self.settings = settings
        self.health_port = health_port
        self.health_host = health_host
        self.health: HealthServer | None = None
        self.draining = False
        self.pool: ActorPool | None = None
        self.worker: BridgeWorker | None = None
        self._started = asyncio.Event()
        self._stop_requested = False
        self._idle_stats = BridgeStats()
        self._gpu_memory: list[tuple[str, float]] = []
        self.status_max_age_s = STATUS_MAX_AGE_S
        self.metrics = self._make_metrics()
        # Why the bridge may not take work, checked by /readyz in order after
        # "draining" and "starting": the pool first; later checks (e.g. a node
        # cache it cannot reach) are added with add_readiness_check.
        self._not_ready: list[NotReady] = [self._pool_not_ready, self._cache_not_ready]

    def add_readiness_check(self, check: NotReady) -> None:
        """Make ``/readyz`` answer 503 with ``check()``'s reason whenever it gives one."""
        self._not_ready.append(check)

    def _stats(self) -> BridgeStats:
        return self.worker.stats if self.worker is not None else self._idle_stats

    def _make_metrics(self) -> BridgeMetrics:
        m = BridgeMetrics(self._stats)
        of = self._of_worker
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
            lambda: float(self.pool.restarts if self.pool else 0),
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
                lambda: float(self.pool.live if self.pool else 0))  # fmt: skip
        for key, name, help_text in _SCALE_GAUGES:
            m.gauge(name, help_text, self._of_scale(key))
        m.counter("alpcrun_pool_actors_released_total", "actors released by downscaling",
                  self._of_scale("released"))  # fmt: skip
        m.labelled_gauge(
            "alpcrun_gpu_memory_used_bytes",
            "GPU memory used, per GPU actor",
            "actor",
            lambda: self._gpu_memory,
        )
        return m  # fmt: skip

    def _of_scale(self, key: str) -> Callable[[], float]:
        """A figure of the pool's scaling state, read at scrape time."""
        return lambda: float(self.pool.scale_status()[key]) if self.pool is not None else 0.0

    def _of_worker(self, read: Callable[[BridgeWorker], float]) -> Callable[[], float]:
        """A metric read from the worker at scrape time (0 before it exists)."""
        return lambda: float(read(self.worker)) if self.worker is not None else 0.0

    async def run(self) -> tuple[int, str]:
        """Serve until stopped; returns (exit code, reason) — never raises for config errors."""
        from ray_alpcrun.pool.actor_pool import ActorPool

        announcer: asyncio.Task[None] | None = None
        exporter: asyncio.Task[None] | None = None
        follower: asyncio.Task[None] | None = None
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
            self.pool.watch(self._on_pool)
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
            self._on_pool(self.pool.availability())
            self._started.set()
            if self._stop_requested:
                return errors.EXIT_OK, ""
            announcer = asyncio.create_task(self._announce(worker), name="announce")
            announcer.add_done_callback(log_task_failure)
            exporter = asyncio.create_task(_export_ray_metrics(self), name="ray-metrics")
            exporter.add_done_callback(log_task_failure)
            if self.auto_slots:
                follower = asyncio.create_task(_follow_pool(self), name="slots-follow-pool")
                follower.add_done_callback(log_task_failure)
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
            background = [task for task in (announcer, exporter, follower) if task is not None]
            for task in background:
                task.cancel()
            # Ended before the pool closes; a failure was logged when it happened.
            await asyncio.gather(*background, return_exceptions=True)
            if self.pool is not None:
                await self.pool.close()
            # Closed last: a Kubernetes preStop hook waits for this port to close.
            if self.health is not None:
                await self.health.stop()

    async def _announce(self, worker: BridgeWorker) -> None:
        """Log "bridge serving" once the queue manager took the first logical worker."""
        await worker.first_registered.wait()
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

    async def drain_counts(self) -> tuple[int, int]:
        """(batches answered after the drained stop began, batches that arrived
        during it and were not started); (0, 0) before a drained stop."""
        w = self.worker
        return (w.drained, w.not_started) if w is not None else (0, 0)

    async def stop(self, drain: bool = True) -> None:
        self._stop_requested = True
        self.draining = True
        await self._started.wait()
        if self.worker is not None:
            await self.worker.stop(drain=drain)

    async def wait_serving(self) -> bool:
        """True once ``run`` serves; False when it ended before it did."""
        await self._started.wait()
        return self.worker is not None

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

    def _on_pool(self, availability: Availability) -> None:
        """The pool's state changed: take work while it can serve (or wait), stop
        taking it while it has given up for now."""
        worker = self.worker
        if worker is None or self.draining:
            return
        if availability.takes_work:
            worker.resume()
        elif availability.state == UNAVAILABLE:
            worker.pause(availability.reason)

    def _cache_not_ready(self) -> str | None:
        return self.worker.cache_unreachable if self.worker is not None else None

    def _pool_not_ready(self) -> str | None:
        if self.pool is None:
            return "starting"
        availability = self.pool.availability()
        return None if availability.takes_work else availability.reason

    async def _ready(self) -> tuple[bool, str]:
        """Readiness, the one rule: 200 exactly while the bridge takes work: at
        least one logical worker registered, and a live actor or one that batches
        may wait for (within --no-actor-grace, or an elastic pool waiting for room);
        503 with the reason otherwise (draining, starting, the pool given up for
        now, a check added with add_readiness_check)."""
        if self.draining:
            return False, "draining"
        if self.worker is None or self.pool is None:
            return False, "starting"
        for check in self._not_ready:
            why = check()
            if why:
                return False, why
        registered = sum(slot.registered.is_set() for slot in self.worker.slots)
        if registered < 1:
            return False, "not registered with the queue manager"
        live, pending = self.pool.live, self.pool.pending
        slots = f"{registered} slot(s) registered"
        if live < 1:
            # Batches wait for actors; the cluster grows for the pending ones.
            waiting = self.pool.waiting_for or self.pool.availability().reason
            return True, f"{slots}; 0 actors, waiting: {waiting}"
        return True, f"{live} actor(s) ({pending} pending), {slots}"

    async def metrics_text(self) -> str:
        await self._refresh_gpu_memory()
        return self.metrics.render()

    async def _refresh_gpu_memory(self) -> None:
        # The pool's status is asynchronous; the registry reads only plain values.
        gpu: list[tuple[str, float]] = []
        # A CPU pool has no GPU to read: no actor call for it.
        if self.pool is not None and self.pool_config.gpus_per_actor > 0:
            pool_status = await self.pool.status(max_age_s=self.status_max_age_s)
            for actor in pool_status.get("actors", []):
                device = actor.get("device") or {}
                if "memory_used_bytes" in device:
                    gpu.append((str(actor.get("actor")), float(device["memory_used_bytes"])))
        self._gpu_memory = gpu

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
            a = self.pool.availability()
            # Which case it is: serving, waiting (for how long), given up for now; and why.
            out["pool"] = {
                "state": a.state,
                "reason": a.reason,
                "no_live_actor_s": a.no_live_s,
                "last_start_error": a.start_error,
                "start_failures": a.start_failures,
                "taking_work": bool(w and w.paused is None),
            }
            out["actor_restarts"] = self.pool.restarts
            out["scaling"] = {"live": self.pool.live, **self.pool.scale_status()}
            out["actors"] = await self.pool.status(max_age_s=self.status_max_age_s)
        return out


async def _follow_pool(bridge: Bridge, period_s: float = 0.25) -> None:
    """Keep the registered logical workers at ``target_slots`` of the pool."""
    from ray_alpcrun.pool.scaling import target_slots

    while True:
        worker, pool = bridge.worker, bridge.pool
        if worker is not None and pool is not None and not bridge.draining:
            worker.resize(target_slots(pool.live, pool.pending, pool.config.highest))
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


def bridge_actor_class() -> Any:
    """The Ray actor class for :class:`Bridge` (imports Ray on first use)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=1000)(Bridge)
