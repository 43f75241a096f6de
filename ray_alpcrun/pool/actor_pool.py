"""ActorPool: a handler running in N Ray actors, driven from asyncio.

Used by the bridge actor and by :mod:`ray_alpcrun.pool.notebook`::

    pool = ActorPool("ray_alpcrun.examples.pricing:Pricer", PoolConfig(num_actors=2))
    await pool.start()
    ref = pool.put_shared("s1", 1, data)         # once per (session, level)
    outcomes = await pool.run("s1", [b"a", b"b"], shared=ref)
    await pool.end_session("s1")
    await pool.close()

Which actors exist (replacements, the elastic grow and release, whether the
pool serves at all) lives in :mod:`ray_alpcrun.pool.membership`; splitting,
least-loaded assignment, retries and timeouts in :mod:`ray_alpcrun.pool.dispatch`
(which sees the membership only as a ``Roster``); the calls to the actors in
:mod:`ray_alpcrun.pool.backend`. This module wires them on Ray and sizes the
pool. Ray's task retries are off (``max_task_retries=0``): the dispatcher
retries, so no task is answered twice. Ray restarts a lost actor
(``max_restarts=-1``), and that restart replaces it in the pool. Nothing here
blocks the event loop: ObjectRefs are awaited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.errors import AlpcrunError, ConfigError, HandlerError
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.backend import RayBackend
from ray_alpcrun.pool.direct import DirectBackend
from ray_alpcrun.pool.dispatch import Dispatcher
from ray_alpcrun.pool.gpu import check_gpu_request
from ray_alpcrun.pool.interfaces import Lifecycle, Listeners, Member, Roster
from ray_alpcrun.pool.membership import CLOSED, WAITING, Availability, Listener, Membership
from ray_alpcrun.pool.pool_actor import CONTROL_GROUP, PoolActor, PoolActorHandle, SharedRef
from ray_alpcrun.pool.scaling import Decision, Scaler
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)

__all__ = ["ActorPool", "SharedRef"]

DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_STATUS_TIMEOUT_S = 5.0
SCALE_TICK_S = 0.25
WAIT_LOG_EVERY_S = 30.0


class ActorPool:
    """A handler in ``config.num_actors`` Ray actors; batches split least-loaded first.

    Ray must be initialised. See the module docstring for an example; also usable
    as ``async with ActorPool(...) as pool``.
    """

    def __init__(self, handler: HandlerSpec, config: PoolConfig | None = None) -> None:
        self.handler = handler
        self.config = config if config is not None else PoolConfig()
        self.start_timeout_s = DEFAULT_START_TIMEOUT_S
        self._backend: RayBackend | DirectBackend | None = None
        self._membership: Membership[PoolActorHandle] | None = None
        self._dispatcher: Dispatcher[PoolActorHandle] | None = None
        self._scaler: asyncio.Task[None] | None = None
        self._listeners = Listeners()
        self._closed = False
        self._status: tuple[float, dict[str, Any]] | None = None  # (loop time, status)
        self._status_round: asyncio.Future[dict[str, Any]] | None = None
        self.decision = Decision(self.config.lowest, reason="start")
        """The elastic pool's latest scale decision (target and why)."""
        self.waiting_for = ""
        """What the pool waits for, while it has fewer live actors than it wants."""
        self.released_under_load = 0
        """Actors released while the bridge held batches: the pool shrank under load."""

    @property
    def size(self) -> int:
        """Number of actors the pool keeps (live or starting; at least 1)."""
        if self._membership is not None and self.config.elastic:
            return max(1, self._membership.size)
        return self.config.num_actors

    @property
    def live(self) -> int:
        """Actors ready to take work now."""
        return len(self._membership.members()) if self._membership is not None else 0

    @property
    def pending(self) -> int:
        """Actors asked for and not ready yet (Ray's demand signal to its autoscaler)."""
        return self._membership.pending if self._membership is not None else 0

    @property
    def restarts(self) -> int:
        """Actors replaced since start (died, unreachable or hung)."""
        return self._membership.restarts if self._membership is not None else 0

    def availability(self) -> Availability:
        """Whether the pool serves, waits for an actor, or gave up for now (and why)."""
        if self._membership is None:
            state = CLOSED if self._closed else WAITING
            return Availability(state, "the actor pool is not running")
        return self._membership.availability()

    def watch(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(availability)`` after every change of the pool's actors
        once it runs (subscribe before :meth:`start`, too); returns the unsubscribe."""
        return self._listeners.add(listener)

    async def start(self) -> None:
        """Create the actors and wait until each has loaded the handler.

        Raises :class:`HandlerError` if the handler cannot be loaded and
        :class:`ConfigError` if the cluster cannot hold the actors.
        """
        if self._membership is not None:
            return
        import ray
        from ray import cloudpickle

        if not ray.is_initialized():
            raise ConfigError("Ray is not initialised: call ray.init() before starting a pool")
        from ray_alpcrun.pool.cluster import check_request, read_cluster

        cfg = self.config
        view = await asyncio.to_thread(read_cluster)
        fits_now = check_request(
            view, cfg.lowest, cfg.highest, cfg.cpus_per_actor, cfg.gpus_per_actor
        )
        if view.source == "static" and cfg.lowest > 0:
            resources: dict[str, float] = await asyncio.to_thread(ray.cluster_resources)
            _check_resources(cfg, resources, cfg.lowest)
        # Wait for the actors that fit now (a broken handler fails here); the
        # rest start in the background and wait for the cluster to grow.
        first = min(cfg.lowest, fits_now)
        try:
            blob = cloudpickle.dumps(self.handler)
        except Exception as exc:
            raise HandlerError(f"handler {self.handler!r} cannot be pickled: {exc}") from exc
        options: dict[str, object] = {
            "num_cpus": cfg.cpus_per_actor,
            "num_gpus": cfg.gpus_per_actor,
            # Ray restarts an actor whose process dies, and the pool takes that
            # restart as the lost actor's replacement (same actor id, backend.py).
            # Ray never retries a call: the dispatcher does, so no task runs twice.
            "max_restarts": -1,
            "max_task_retries": 0,
        }
        options.update(cfg.actor_options)
        # concurrency_groups cannot go through .options(); it belongs to the class.
        actor_class = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(PoolActor)
        restartable = options["max_restarts"] != 0
        calls = RayBackend(actor_class.options(**options), blob, cfg, restartable=restartable)
        backend: RayBackend | DirectBackend = calls
        if cfg.data_path == "direct":
            backend = DirectBackend(calls)
        membership: Membership[PoolActorHandle] = Membership(
            self._lifecycle(backend),
            num_actors=first,
            # A pool still waiting for the cluster to grow may wait like an elastic one.
            elastic=cfg.elastic or first < cfg.lowest,
            restart_backoff_max_s=cfg.restart_backoff_max_s,
            no_actor_grace_s=cfg.no_actor_grace_s,
            busy_elsewhere=self._busy_elsewhere,
        )
        dispatcher = dispatcher_for(self._roster_of(membership), backend, calls, cfg)
        try:
            await asyncio.wait_for(membership.start(), self.start_timeout_s)
        except BaseException as exc:
            for actor in list(backend.handles.values()):
                backend.kill(actor)
            if isinstance(exc, asyncio.TimeoutError):
                raise ConfigError(
                    f"{first} pool actor(s) did not start within "
                    f"{self.start_timeout_s:g} s; does the cluster have the resources?"
                ) from exc
            raise
        self._attach(backend, membership, dispatcher)
        membership.grow(cfg.lowest - first)
        if cfg.elastic or first < cfg.lowest:
            self._scaler = asyncio.create_task(self._scale(view.source))
        log.info(
            "actor pool started: %d actor(s) ready, %d starting, %s; %g CPU and %g GPU each",
            first,
            cfg.lowest - first,
            f"elastic {cfg.lowest}..{cfg.highest}" if cfg.elastic else "fixed",
            cfg.cpus_per_actor,
            cfg.gpus_per_actor,
        )

    # -- hooks for a pool served by several bridges (pool/cluster_pool.py) ---

    def _lifecycle(self, backend: RayBackend | DirectBackend) -> Lifecycle[PoolActorHandle]:
        return backend

    def _roster_of(self, membership: Membership[PoolActorHandle]) -> Roster[PoolActorHandle]:
        return membership

    def _busy_elsewhere(self, member: Member[PoolActorHandle]) -> int:
        return 0

    def load(self) -> int:
        """Batches held (running or waiting): what the elastic pool scales on."""
        return self._dispatcher.batches if self._dispatcher is not None else 0

    def _attach(
        self,
        backend: RayBackend | DirectBackend,
        membership: Membership[PoolActorHandle],
        dispatcher: Dispatcher[PoolActorHandle],
    ) -> None:
        """Serve with these (``start`` builds them on Ray; tests pass fakes)."""
        self._backend, self._membership, self._dispatcher = backend, membership, dispatcher
        membership.watch(self._changed)

    def _changed(self, availability: Availability) -> None:
        self._listeners.notify(availability)

    async def _scale(self, source: str) -> None:
        """The elastic pool's loop: sample the load, ask for or release actors.

        A fixed pool still waiting for room runs it only to say what it waits for."""
        from ray_alpcrun.pool.cluster import shape_text

        membership, dispatcher = self._membership, self._dispatcher
        assert membership is not None and dispatcher is not None  # started before this runs
        cfg = self.config
        scaler = Scaler(
            cfg.lowest, cfg.highest, cfg.target_batches_per_actor, cfg.downscale_delay_s
        )
        loop = asyncio.get_running_loop()
        logged_wait = -WAIT_LOG_EVERY_S
        while True:
            now = loop.time()
            live, pending = len(membership.members()), membership.pending
            if cfg.elastic:
                decision = scaler.decide(self.load(), live, pending, now)
            else:
                decision = Decision(cfg.num_actors)
            if decision.start:
                membership.grow(decision.start)
            released = membership.release(decision.release) if decision.release else 0
            if released and self.load() > 0:
                self.released_under_load += released
            if decision.start or released:
                log.info(
                    "pool scaling: %s",
                    f"+{decision.start} actor(s)" if decision.start else f"-{released} actor(s)",
                    extra=fields(
                        reason=decision.reason, target=decision.target, live=live, pending=pending
                    ),
                )
            self.decision = decision
            if pending and live < decision.target:
                self.waiting_for = (
                    f"{pending} actor(s) of {shape_text(cfg.cpus_per_actor, cfg.gpus_per_actor)} "
                    f"waiting for room ({live} live, target {decision.target}; cluster: {source})"
                )
                if now - logged_wait >= WAIT_LOG_EVERY_S:
                    logged_wait = now
                    log.info("pool waiting: %s", self.waiting_for)
                    if membership.start_error:
                        log.warning("last actor start failed: %s", membership.start_error)
            else:
                self.waiting_for = ""
            await asyncio.sleep(SCALE_TICK_S)  # ok: sampling period of the scaler

    def put_shared(self: object, session_id: str, level: int | None, payload: bytes) -> SharedRef:
        """Put a session's shared data in the object store, once; pass the result to :meth:`run`.

        Stored as a uint8 array so actors read it from shared memory without a
        copy. Copies ``payload`` once (use :meth:`aput_shared` for big data in
        async code).
        """
        import numpy as np
        import ray

        ref = ray.put(np.frombuffer(payload, dtype=np.uint8))
        return SharedRef(session_id, level, ref)

    async def aput_shared(
        self: object, session_id: str, level: int | None, payload: bytes
    ) -> SharedRef:
        """:meth:`put_shared` off the event loop (the copy of big data takes a while)."""
        return await asyncio.to_thread(ActorPool.put_shared, self, session_id, level, payload)

    async def run(
        self,
        session_id: str,
        payloads: Sequence[bytes],
        shared: SharedRef | None = None,
        tags: Sequence[str] = (),
    ) -> list[Outcome]:
        """Run a batch: ``[(result, None) | (None, error)]``, one per payload, in order.

        Raises :class:`~ray_alpcrun.errors.SessionSetupError` if the session's
        shared data or start hook failed (nothing ran).
        """
        return await self._running().run(session_id, payloads, shared, tuple(tags))

    async def end_session(self, session_id: str) -> None:
        """Run the session end hook on every actor and free the session's state."""
        await self._running().end_session(session_id)

    async def status(
        self, timeout_s: float = DEFAULT_STATUS_TIMEOUT_S, max_age_s: float = 0.0
    ) -> dict[str, Any]:
        """Pool counters and each live actor's status (pid, sessions, shared decodes, ...).

        With ``max_age_s`` (the health endpoint's 1 s), one round of actor calls
        serves every caller for that long: callers meanwhile share the round in
        progress or get its answer again, so a flood of requests costs the
        actors nothing more. Without it, the actors are asked now."""
        membership, dispatcher, backend = self._membership, self._dispatcher, self._backend
        if membership is None or dispatcher is None or backend is None:
            return {"started": False, "size": self.size, "restarts": 0, "actors": []}
        if max_age_s <= 0:
            return await self._read_status(membership, dispatcher, backend, timeout_s)
        now = asyncio.get_running_loop().time()
        if self._status is not None and now - self._status[0] < max_age_s:
            return self._status[1]
        if self._status_round is None:
            reading = self._read_status(membership, dispatcher, backend, timeout_s)
            self._status_round = asyncio.ensure_future(reading)
            self._status_round.add_done_callback(self._status_read)
        # Shielded: a caller that goes away (a closed HTTP request) leaves the round to the others.
        return await asyncio.shield(self._status_round)

    def _status_read(self, round_: asyncio.Future[dict[str, Any]]) -> None:
        self._status_round = None
        if not round_.cancelled() and round_.exception() is None:
            self._status = (asyncio.get_running_loop().time(), round_.result())

    async def _read_status(
        self,
        membership: Membership[PoolActorHandle],
        dispatcher: Dispatcher[PoolActorHandle],
        backend: RayBackend | DirectBackend,
        timeout_s: float,
    ) -> dict[str, Any]:
        members = membership.members()
        infos = await asyncio.gather(*(backend.status(m.actor, timeout_s) for m in members))
        actors = [
            {"actor": m.index, "inflight": m.inflight, **info}
            for m, info in zip(members, infos, strict=True)
        ]
        return {
            "started": True,
            "size": self.size,
            "live": len(members),
            **self.scale_status(),
            "restarts": membership.restarts,
            "task_cost_s": dispatcher.task_cost_s,
            "actors": actors,
        }

    def scale_status(self) -> dict[str, Any]:
        """The elastic figures for /status and /metrics: alive, pending, target, why."""
        m, d = self._membership, self._dispatcher
        return {
            "elastic": self.config.elastic,
            "min_actors": self.config.lowest,
            "max_actors": self.config.highest,
            "pending": m.pending if m is not None else 0,
            "target": self.decision.target,
            "reason": self.decision.reason,
            "batches": d.batches if d is not None else 0,
            "released": m.released if m is not None else 0,
            "released_under_load": self.released_under_load,
            "requested": m.requested if m is not None else 0,
            "waiting_for": self.waiting_for,
        }

    async def settle(self) -> None:
        """Wait until actors being replaced are back (or the pool closed)."""
        if self._membership is not None:
            await self._membership.settle()

    async def close(self) -> None:
        """Kill every actor. Idempotent."""
        self._closed = True
        membership, self._membership = self._membership, None
        self._dispatcher = None
        scaler, self._scaler = self._scaler, None
        if scaler is not None:
            scaler.cancel()
            await asyncio.gather(scaler, return_exceptions=True)
        if membership is not None:
            await membership.close()
        round_, self._status_round, self._status = self._status_round, None, None
        if round_ is not None:
            round_.cancel()
            await asyncio.gather(round_, return_exceptions=True)
        backend, self._backend = self._backend, None
        if backend is not None:
            await backend.close()  # graphs torn down (waited for), sockets closed

    async def __aenter__(self) -> ActorPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _running(self) -> Dispatcher[PoolActorHandle]:
        if self._dispatcher is None:
            raise AlpcrunError("the actor pool is not running (call start() first)")
        return self._dispatcher


def dispatcher_for(
    roster: Roster[PoolActorHandle],
    backend: RayBackend | DirectBackend,
    calls: RayBackend,
    cfg: PoolConfig,
) -> Dispatcher[PoolActorHandle]:
    """The dispatcher every pool runs (a coordinator's, a node bridge's): ``cfg``'s
    split, retries and timeout; ``calls`` learns the measured cost per task from it."""
    dispatcher: Dispatcher[PoolActorHandle] = Dispatcher(
        roster,
        backend,
        min_chunk=cfg.min_chunk,
        min_chunk_work_s=cfg.min_chunk_work_s,
        max_call_retries=cfg.max_call_retries,
        task_timeout_s=cfg.task_timeout_s,
    )
    calls.task_cost = lambda: dispatcher.task_cost_s
    return dispatcher


def _check_resources(cfg: PoolConfig, resources: dict[str, float], count: int) -> None:
    """Fail fast instead of waiting forever for actors a static cluster can never place."""
    cluster_gpus = float(resources.get("GPU", 0.0))
    check_gpu_request(count, cfg.gpus_per_actor, cluster_gpus)
    cluster_cpus = float(resources.get("CPU", 0.0))
    if count * cfg.cpus_per_actor > cluster_cpus + 1e-9:
        raise ConfigError(
            f"{count} actor(s) x {cfg.cpus_per_actor:g} CPU asked for, "
            f"but the Ray cluster has {cluster_cpus:g} CPU(s); lower --actors or the CPUs per actor"
        )
