"""Start the bridge actor from Python (the CLI, the demo, tests and notebooks)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from ray_alpcrun import errors
from ray_alpcrun.bridge.raylogs import strip_ansi
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.config import BridgeConfig, PoolConfig

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ray_alpcrun.pool.pool_actor import RemoteMethod


class BridgeActorHandle(Protocol):
    """A :class:`~ray_alpcrun.bridge.actor.Bridge` as Ray hands it out (its ``ActorHandle``)."""

    @property
    def run(self) -> RemoteMethod[tuple[int, str]]: ...
    @property
    def stop(self) -> RemoteMethod[None]: ...
    @property
    def wait_ready(self) -> RemoteMethod[bool]: ...
    @property
    def wait_serving(self) -> RemoteMethod[bool]: ...
    @property
    def status(self) -> RemoteMethod[dict[str, object]]: ...
    @property
    def drain_counts(self) -> RemoteMethod[tuple[int, int]]: ...


def worker_settings(config: BridgeConfig, slots: int) -> WorkerSettings:
    s = config.services
    return WorkerSettings(
        queue_address=s.queue_address,
        cache_address=s.cache_address,
        api_key=s.api_key,
        proto_package=s.proto_package,
        node=config.identity.node,
        pod=config.identity.pod,
        slots=slots,
        tls=s.tls,
        cache_tls=s.cache_tls,
        max_message_bytes=s.max_message_bytes,
        backoff_initial_s=config.backoff_initial_s,
        backoff_max_s=config.backoff_max_s,
        max_connect_attempts=config.max_connect_attempts,
        drain_timeout_s=config.drain_timeout_s,
        session_linger_s=config.session_linger_s,
    )


def resolve_pool(config: BridgeConfig) -> PoolConfig:
    """The pool settings, with the actor count defaulting to as many actors as the
    cluster's CPUs (and GPUs, for GPU actors) can hold, at least one: a pool the
    cluster cannot place at all then fails its start with exit 3."""
    if config.pool is not None and not config.size_pool_from_cluster:
        return config.pool
    import ray

    pool = config.pool or PoolConfig(data_path=config.data_path)
    resources = ray.cluster_resources()
    fits = []
    if pool.cpus_per_actor > 0:
        fits.append(float(resources.get("CPU", 1.0)) / pool.cpus_per_actor)
    if pool.gpus_per_actor > 0:
        fits.append(float(resources.get("GPU", 0.0)) / pool.gpus_per_actor)
    count = int(min(fits)) if fits else int(resources.get("CPU", 1.0))
    return replace(pool, num_actors=max(1, count))


@dataclass
class BridgeHandle:
    """A running bridge actor. ``run_ref`` resolves to ``(exit_code, reason)``;
    ``serving_ref`` to True once it serves (False if ``run`` ended first);
    ``alive_ref`` once the actor was made (its ``__init__`` ran: any quick call
    queued at creation tells; ``drain_counts`` answers a non-empty tuple)."""

    actor: BridgeActorHandle
    run_ref: Awaitable[tuple[int, str]]  # an ObjectRef
    config: BridgeConfig
    serving_ref: Awaitable[bool]  # an ObjectRef
    alive_ref: Awaitable[object] | None = None  # an ObjectRef

    def outcome(self, timeout_s: float | None = None) -> tuple[int, str]:
        """Block until ``run`` ends; its ``(exit_code, reason)``.

        A bridge actor that died says so in one line instead of raising Ray's
        error: ``EXIT_CONFIG`` when it died before it was even made (it could not
        start on this cluster, e.g. a worker process that cannot join it), and
        ``EXIT_FAILURE`` when it died serving or while it started (killed: a
        supervisor restarts it; the outside chaos run counted 16 such exits 3 in
        28 restarts, which ``RestartPreventExitStatus=3`` would have left down)."""
        import ray
        from ray.exceptions import ActorUnschedulableError, RayActorError

        try:
            code, reason = ray.get(self.run_ref, timeout=timeout_s)
        except (RayActorError, ActorUnschedulableError) as exc:
            if _resolved(self.serving_ref):
                return (
                    errors.EXIT_FAILURE,
                    f"the bridge actor died while serving: {ray_reason(exc)}",
                )
            if self.alive_ref is not None and _resolved(self.alive_ref):
                return (
                    errors.EXIT_FAILURE,
                    f"the bridge actor died while it started: {ray_reason(exc)}",
                )
            return (
                errors.EXIT_CONFIG,
                f"the bridge actor died before it could serve: {ray_reason(exc)}",
            )
        return int(code), str(reason)

    def stop(self, drain: bool = True) -> Awaitable[None]:
        """Ask the bridge to stop (returns an ObjectRef; ``run_ref`` resolves after)."""
        return self.actor.stop.remote(drain)

    def drain_counts(self, timeout_s: float = 10.0) -> tuple[int, int] | None:
        """After ``run`` ended: (batches drained, batches not started) of its drained
        stop; None when the actor cannot tell (it died)."""
        import ray
        from ray.exceptions import RayError

        try:
            drained, not_started = ray.get(self.actor.drain_counts.remote(), timeout=timeout_s)
        except RayError:  # a timeout is one too
            return None
        return int(drained), int(not_started)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    def status(self) -> Awaitable[dict[str, object]]:
        return self.actor.status.remote()

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until every slot is registered (raises the bridge's failure, if any)."""
        import ray

        ready_ref = self.actor.wait_ready.remote(timeout_s)
        done, _ = ray.wait([ready_ref, self.run_ref], num_returns=1, timeout=timeout_s)
        if not done:
            raise TimeoutError(f"bridge not ready after {timeout_s} s")
        if done[0] == self.run_ref:
            code, reason = ray.get(self.run_ref)
            raise RuntimeError(f"bridge exited with code {code}: {reason}")
        return bool(ray.get(ready_ref))

    async def wait_ready_async(self, timeout_s: float = 60.0) -> bool:
        ready = asyncio.ensure_future(self.actor.wait_ready.remote(timeout_s))
        ended = asyncio.ensure_future(self.run_ref)
        done, _ = await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ended in done:
            ready.cancel()
            code, reason = ended.result()
            raise RuntimeError(f"bridge exited with code {code}: {reason}")
        return bool(ready.result())


def start_bridge(config: BridgeConfig, name: str | None = None) -> BridgeHandle:
    """Create the bridge actor and start serving; Ray must be initialised."""
    from ray_alpcrun.bridge.actor import bridge_actor_class

    pool = resolve_pool(config)
    config = replace(config, pool=pool, size_pool_from_cluster=False)
    auto_slots = config.slots is None and pool.elastic
    if config.slots is not None:
        slots = config.slots
    elif pool.elastic:
        from ray_alpcrun.pool.scaling import target_slots

        slots = target_slots(0, pool.lowest, pool.highest)
    else:
        slots = pool.num_actors
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this (the driver's) node: the health port, node identity and node cache are here.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    options: dict[str, object] = {"scheduling_strategy": here}
    if name is not None:
        options["name"] = name
    cls = bridge_actor_class().options(**options)
    from ray_alpcrun.bridge.node import node_bridge_class

    per_node = config.bridges == "per-node"
    actor = cls.remote(
        config.handler,
        pool,
        worker_settings(config, slots),
        config.log_level,
        config.log_json,
        config.health_port,
        config.health_host,
        auto_slots,
        config.bridges,
        config.slots,
        node_bridge_class if per_node else None,
    )
    return BridgeHandle(
        actor=actor,
        run_ref=actor.run.remote(),
        config=config,
        serving_ref=actor.wait_serving.remote(),
        alive_ref=actor.drain_counts.remote(),
    )


def _resolved(ref: Awaitable[object]) -> bool:
    """Whether ``ref`` (an ObjectRef of the bridge actor) resolved to a true value:
    long ago if it did; it fails at once with a dead actor otherwise."""
    import ray
    from ray.exceptions import RayError

    try:
        return bool(ray.get(ref, timeout=10))
    except RayError:
        return False


def ray_reason(exc: BaseException) -> str:
    """The line of a Ray actor error that says why: its first, past Ray's generic
    header and the indented fields after it, plus, when ``__init__`` raised, the
    exception's own last line (the first names only the actor)."""
    from ray.exceptions import ActorDiedError, RayActorError

    generic = {RayActorError.BASE_ERROR_MSG, ActorDiedError.BASE_ERROR_MSG}
    lines = [strip_ansi(line) for line in str(exc).splitlines()]
    said = [line.strip() for line in lines if line.strip() and not line[0].isspace()]
    useful = [line for line in said if line not in generic] or said or [type(exc).__name__]
    if getattr(exc, "actor_init_failed", False) and len(useful) > 1:
        return f"{useful[0]} ... {useful[-1]}"
    return useful[0]
