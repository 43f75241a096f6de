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
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ray_alpcrun import errors
from ray_alpcrun.bridge.background import (
    _export_ray_metrics,
    _follow_pool,
    _read_actor_counters,
    _trim_heap,
)
from ray_alpcrun.bridge.debugging import MemoryTrace, describe_tasks
from ray_alpcrun.bridge.figures import ActorTally, make_metrics
from ray_alpcrun.bridge.nodes import wait_registered
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import STAT_FIELDS, BridgeStats
from ray_alpcrun.bridge.worker import BridgeWorker
from ray_alpcrun.config import PoolConfig
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.health import HealthServer
from ray_alpcrun.logs import fields, log_task_failure, setup_logging
from ray_alpcrun.pool.membership import UNAVAILABLE
from ray_alpcrun.runtime import Outcome

if TYPE_CHECKING:
    from ray_alpcrun.bridge.nodes import NodeBridges
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
        bridges: str = "one",
        fixed_slots: int | None = None,
        node_bridge_class: Callable[[], Any] | None = None,
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
        # "per-node": the pool's actors on other nodes are served by node bridges.
        self.bridges = bridges
        self.fixed_slots = fixed_slots  # --slots K as given (node bridges register K each)
        self.nodes: NodeBridges | None = None
        # How node bridges are made (launch passes node.node_bridge_class).
        self.node_bridge_class = node_bridge_class
        self.exports_metrics = True
        self.decodes = ActorTally("shared_decodes")  # read by _read_actor_counters
        self.ready_here = False  # this bridge's own readiness, as of the last scrape
        self.metrics = make_metrics(self)
        self._memory = MemoryTrace()
        # Why the bridge may not take work, checked by /readyz in order after
        # "draining" and "starting": the pool first; later checks (e.g. a node
        # cache it cannot reach) are added with add_readiness_check.
        self._not_ready: list[NotReady] = [self._pool_not_ready, self._cache_not_ready]

    def add_readiness_check(self, check: NotReady) -> None:
        """Make ``/readyz`` answer 503 with ``check()``'s reason whenever it gives one."""
        self._not_ready.append(check)

    def _stats(self) -> BridgeStats:
        own = self.worker.stats if self.worker is not None else self._idle_stats
        return own if self.nodes is None else self.nodes.summed(own)

    async def run(self) -> tuple[int, str]:
        """Serve until stopped; returns (exit code, reason) — never raises for config errors."""

        background: list[asyncio.Task[None]] = []

        def spawn(loop: Coroutine[Any, Any, None], name: str) -> None:
            background.append(asyncio.create_task(loop, name=name))
            background[-1].add_done_callback(log_task_failure)

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
            self.pool = self.make_pool()
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
            spawn(self._announce(worker), "announce")
            spawn(_trim_heap(), "heap-trim")
            if self.exports_metrics:
                spawn(_export_ray_metrics(self), "ray-metrics")
                spawn(_read_actor_counters(self), "actor-counters")
            if self.bridges == "per-node" and self.node_bridge_class is not None:
                from ray_alpcrun.bridge.nodes import start_node_bridges

                self.nodes = start_node_bridges(self)
                self.update_intake()  # the coordinator's slots: its own node's actors
            if self.auto_slots:
                spawn(_follow_pool(self), "slots-follow-pool")
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
            for task in background:
                task.cancel()
            # Ended before the pool closes; a failure was logged when it happened.
            await asyncio.gather(*background, return_exceptions=True)
            if self.nodes is not None:
                await self.nodes.close(drain=False)  # before the pool kills the actors
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

    def make_pool(self) -> Any:
        """The pool this bridge serves: its own actors, or with node bridges the
        cluster's (it serves those on its node itself)."""
        from ray_alpcrun.pool.actor_pool import ActorPool

        if self.bridges != "per-node" or self.node_bridge_class is None:
            return ActorPool(self.handler, self.pool_config)
        import ray

        from ray_alpcrun.pool.cluster_pool import ClusterPool

        node = ray.get_runtime_context().get_node_id()
        return ClusterPool(self.handler, self.pool_config, node)

    async def member_lost(self, index: int, key: str, reason: str, killed: bool) -> bool:
        """A node bridge lost pool member ``index`` (actor ``key``): replace it."""
        from ray_alpcrun.pool.cluster_pool import ClusterPool

        pool = self.pool
        return isinstance(pool, ClusterPool) and pool.member_lost(index, key, reason, killed)

    async def stop(self, drain: bool = True) -> None:
        self._stop_requested = True
        self.draining = True
        await self._started.wait()
        stopping = [] if self.worker is None else [self.worker.stop(drain=drain)]
        if self.nodes is not None:
            stopping.append(self.nodes.close(drain=drain))
        await asyncio.gather(*stopping)

    async def wait_serving(self) -> bool:
        """True once ``run`` serves; False when it ended before it did."""
        await self._started.wait()
        return self.worker is not None

    async def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """True once every slot is registered with the queue manager, or a node bridge's."""
        await asyncio.wait_for(self._started.wait(), timeout_s)
        if self.worker is None:
            return False
        await wait_registered(self.worker, self.nodes, timeout_s)
        return True

    async def _live(self) -> tuple[bool, str]:
        # Answering at all proves the event loop turns.
        return True, "draining" if self.draining else "serving"

    def _on_pool(self, availability: Availability) -> None:
        self.update_intake()

    def update_intake(self) -> None:
        """Take work while the pool can serve (or wait), stop taking it while it has
        given up for now; with node bridges, the placeholder logical workers of a
        coordinator without actors of its own end once a node bridge registers."""
        worker, pool = self.worker, self.pool
        if worker is None or pool is None or self.draining:
            return
        self.follow_slots()
        availability = pool.availability()
        nodes = self.nodes
        if nodes is not None and nodes.serve_elsewhere() and not nodes.has_local_actors():
            worker.pause("node bridges serve the pool's actors")
        elif availability.takes_work:
            worker.resume()
        elif availability.state == UNAVAILABLE:
            worker.pause(availability.reason)

    def wanted_slots(self) -> int | None:
        """How many logical workers to keep registered now (None: as they are).

        With actors on other nodes, the coordinator registers for its own node's
        actors only, as a node bridge does (the node bridges register for
        theirs): one per live actor here, at least one (the placeholder while it
        has none), an elastic pool's headroom slot included. Otherwise an elastic
        pool's slots follow the whole pool (``--slots auto``); ``--slots K`` stays K.
        """
        from ray_alpcrun.pool.scaling import target_slots

        pool, nodes = self.pool, self.nodes
        if pool is None or self.fixed_slots is not None:
            return None
        if nodes is not None and nodes.serves_remote():
            local = nodes.local_live()
            elastic = pool.config.elastic
            return target_slots(local, 0, pool.config.highest) if elastic else max(1, local)
        if self.auto_slots:
            return target_slots(pool.live, pool.pending, pool.config.highest)
        return None

    def follow_slots(self) -> None:
        worker, wanted = self.worker, self.wanted_slots()
        if worker is not None and wanted is not None and not self.draining:
            worker.resize(wanted)

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
        ready, why = await self._ready_here()
        if not ready and self.nodes is not None and self.nodes.any_ready():
            return True, f"node bridges take work ({self.nodes.describe_ready()})"
        return ready, why

    async def _ready_here(self) -> tuple[bool, str]:
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
        # The registry reads plain values; readiness is asynchronous.
        self.ready_here = (await self._ready_here())[0]
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

    async def debug_tasks(self, frames: int = 6) -> list[str]:
        """Every asyncio task here and where it waits (``bridge/debugging.py``)."""
        return describe_tasks(frames)

    async def debug_memory(self, top: int = 15, trim: bool = False) -> list[str]:
        """The C heap, and where Python memory grew (``PYTHONTRACEMALLOC`` only)."""
        return self._memory.growth(top, trim)

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
        if self.nodes is not None:
            # The deployment's counters: this bridge's and every node bridge's.
            for name in STAT_FIELDS:
                out[name] = out.get(name, 0) + self.nodes.stats_sum(name)
            out["bridges"] = self.nodes.describe()
            out["bridges_replaced"] = self.nodes.replaced
            out["bridges_stopped_empty"] = self.nodes.stopped_empty
        return out


def bridge_actor_class() -> Any:
    """The Ray actor class for :class:`Bridge` (imports Ray on first use)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=1000)(Bridge)
