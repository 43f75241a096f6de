"""The dispatcher's :class:`~ray_alpcrun.pool.membership.Backend` on Ray actors.

Ray's failures become the project's at this boundary: a dead or unreachable
actor is :class:`ActorLost` (the dispatcher replaces it and retries), a session
that cannot start on an actor is :class:`SessionSetupError`. Sub-batches that
queue for a busy actor travel together in one Ray call (:mod:`.coalesce`).
Nothing here blocks the event loop: ObjectRefs are awaited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.errors import ActorLost, ConfigError, HandlerError, SessionSetupError
from ray_alpcrun.pool.coalesce import Coalescer
from ray_alpcrun.pool.dispatch import CallResult
from ray_alpcrun.pool.pool_actor import (
    ActorInfo,
    PoolActorClass,
    PoolActorHandle,
    RunArgs,
    RunReply,
    SharedRef,
)
from ray_alpcrun.runtime import describe

log = logging.getLogger(__name__)

# One call per actor is in flight; what queues behind it travels in the next one.
# A second call goes out at once only if it carries this much measured handler
# work: then the actor finds it waiting instead of idling for a round trip, and
# the round trip (~1 ms of CPU over two processes) is small beside its work.
WORTH_A_CALL_S = 0.002

# A recycled (lost) actor is asked ``ready`` until its next incarnation answers.
# Its old process, still there (hung, or unreachable from the dispatcher), is
# killed so that Ray restarts it; one that does not answer within
# RECYCLE_CHECK_S counts as still there. One that Ray restarts by itself (the
# process died) is not killed again. After RECYCLE_TRIES answers from the old
# process or failed calls, RECYCLE_RETRY_S apart, a new actor is started; a
# restart that waits for room waits without limit, like a new actor. (Ray 2.60:
# a restart after SIGKILL answers in about 2 s, after one ActorUnavailableError;
# an actor killed for good raises ActorDiedError at once.)
RECYCLE_CHECK_S = 2.0
RECYCLE_TRIES = 50
RECYCLE_RETRY_S = 0.1


class RayBackend:
    """The dispatcher's :class:`~ray_alpcrun.pool.dispatch.Backend` on Ray actors."""

    def __init__(
        self,
        actor_class: PoolActorClass,
        handler_blob: bytes,
        config: PoolConfig,
        *,
        restartable: bool = False,
    ) -> None:
        import ray

        self._ray = ray
        self.lost_errors: tuple[type[BaseException], ...] = (
            ray.exceptions.RayActorError,  # includes ActorDiedError, ActorUnavailableError
            ray.exceptions.ObjectLostError,
        )
        """Ray's errors for an actor that is gone (the other paths add their own)."""
        self._task_error = ray.exceptions.RayTaskError
        self._actor_class = actor_class
        self._blob = handler_blob
        self._config = config
        self._sys_path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        # Every actor created and not yet killed, so a failed start leaks none.
        self.handles: dict[int, PoolActorHandle] = {}
        # The Ray node each actor was placed on (id(actor) -> node id), from its ready().
        self.node_of: dict[int, str] = {}
        # Lost actors that Ray restarts (``max_restarts=-1``), each with the worker
        # id of the incarnation that was lost; the next start takes one (below).
        self._restartable = restartable
        self._spares: list[tuple[PoolActorHandle, object]] = []
        self._worker_of: dict[int, object] = {}
        self.recycled = 0
        """Lost actors that came back as restarts of the same Ray actor."""
        # Sub-batches that queue for a busy actor travel together in one Ray call.
        self._calls: Coalescer[PoolActorHandle, RunArgs, RunReply] = Coalescer(
            self.run_one, self._run_many, max_outstanding=1, worth_a_call=self.worth_a_call
        )
        self.task_cost: Callable[[], float | None] = lambda: None
        """Handler seconds per task, as measured so far (the pool wires in the dispatcher's)."""

    @property
    def sends(self) -> int:
        """Ray calls sent so far for sub-batches (each may carry several)."""
        return self._calls.calls

    async def start_actor(self) -> PoolActorHandle:
        """A new actor, or a lost one that Ray restarted: its owner (this process)
        keeps about 5.6 KB per actor id for good (Ray's core worker never drops an
        actor handle, ``benchmarks/actor_churn.py``), so a pool that replaced its
        actors with new ones grew by that much per loss."""
        while self._spares:
            actor, was = self._spares.pop()  # still in self.handles (recycle)
            try:
                restarted = await self._restarted(actor, was)
            except BaseException:
                self.kill(actor)  # released while it restarted, or its handler failed
                raise
            if restarted is not None:
                self.recycled += 1
                return self._ready(actor, restarted)
            log.info("a lost pool actor was not restarted; starting a new one")
            self.kill(actor)
        cfg = self._config
        actor = self._actor_class.remote(
            self._blob,
            max_sessions=cfg.max_sessions_per_actor,
            use_gpu=cfg.gpus_per_actor > 0,
            gpu_memory_limit_bytes=cfg.gpu_memory_limit_bytes,
            memory_limit_bytes=cfg.memory_limit_bytes,
            sys_path=self._sys_path,
            log=(cfg.log_level, cfg.log_json),
        )
        self.handles[id(actor)] = actor
        try:
            info = await actor.ready.remote()
        except asyncio.CancelledError:
            # Released while waiting for room: the pending actor is Ray's demand
            # signal to the autoscaler, so it must go too.
            self.kill(actor)
            raise
        except self.lost_errors as exc:
            self.kill(actor)
            if getattr(exc, "actor_init_failed", False):
                raise HandlerError(f"pool actor failed to start: {first_line(exc)}") from exc
            # Its process died (killed, OOM, node lost): another start may well work.
            raise ActorLost(f"pool actor died while it started: {first_line(exc)}") from exc
        return self._ready(actor, info)

    def _ready(self, actor: PoolActorHandle, info: ActorInfo) -> PoolActorHandle:
        if "error" in info:
            self.kill(actor)
            kind = ConfigError if info.get("error_kind") == "device" else HandlerError
            raise kind(info["error"])
        log.debug("pool actor ready: %s", info)
        node_id = info.get("node_id")
        if isinstance(node_id, str):
            self.node_of[id(actor)] = node_id
        self._worker_of[id(actor)] = info.get("worker_id")
        return actor

    def same_process(self, actor: PoolActorHandle, info: ActorInfo) -> bool:
        """Whether ``info`` (from ``status``) came from the incarnation that started,
        not from one that Ray restarted by itself (after its process or node died)."""
        was = self._worker_of.get(id(actor))
        return was is None or info.get("worker_id") in (None, was)

    async def _restarted(self, actor: PoolActorHandle, was: object) -> ActorInfo | None:
        """``ready`` of the recycled ``actor``'s next incarnation (``was`` is the lost
        one's worker id), or None when Ray does not bring one."""
        killed = was is None
        if killed:
            self._restart(actor)
        for _ in range(RECYCLE_TRIES):
            ready = actor.ready.remote()
            try:
                info = await (ready if killed else asyncio.wait_for(ready, RECYCLE_CHECK_S))
            except asyncio.TimeoutError:
                info = {"worker_id": was}  # no answer: as if the old process were there
            except self._ray.exceptions.ActorDiedError as exc:
                if getattr(exc, "actor_init_failed", False):
                    raise HandlerError(f"pool actor failed to start: {first_line(exc)}") from exc
                return None  # dead for good (ray.kill with no_restart): not restarted
            except self.lost_errors:
                info = None  # ActorUnavailableError: Ray is restarting it
            if info is not None:
                if was is None or info.get("worker_id") != was:
                    return info
                if not killed:
                    self._restart(actor)  # the old process is still there: hung or cut off
                    killed = True
            await asyncio.sleep(RECYCLE_RETRY_S)  # ok: until Ray has restarted it
        return None

    def _restart(self, actor: PoolActorHandle) -> None:
        try:
            self._ray.kill(actor, no_restart=False)
        except Exception as exc:  # gone already: the next ready says how
            log.debug("ray.kill failed: %s", exc)

    async def call(
        self,
        actor: PoolActorHandle,
        session_id: str,
        payloads: list[bytes],
        shared: object,
        tags: tuple[str, ...],
    ) -> CallResult:
        ref = as_shared_ref(shared)
        sending = self._calls.call(actor, id(actor), (session_id, payloads, ref, tags))
        return await self.reply_of(sending, len(payloads))

    async def reply_of(
        self,
        sending: Awaitable[RunReply],
        n: int,
        lost: tuple[type[BaseException], ...] | None = None,
    ) -> CallResult:
        """A sub-batch's reply as the dispatcher takes it, whichever path sent it:
        the actor's loss (``lost``; default the ordinary call's) raises
        :class:`ActorLost`, Ray failing around the call fails its ``n`` tasks,
        and a session that cannot start raises :class:`SessionSetupError`."""
        gone = self.lost_errors if lost is None else lost
        try:
            reply = await sending
        except gone as exc:
            raise ActorLost(first_line(exc)) from exc
        except self._task_error as exc:
            # PoolActor.run catches handler errors itself: this is Ray failing
            # around the call (e.g. arguments that cannot be unpickled).
            return [(None, f"pool actor call failed: {first_line(exc)}")] * n, None
        if isinstance(reply, str):
            raise SessionSetupError(reply)
        return reply

    @staticmethod
    async def run_one(actor: PoolActorHandle, part: RunArgs) -> RunReply:
        """One sub-batch as one ordinary call (no coalescing)."""
        return await actor.run.remote(*part)

    @staticmethod
    async def _run_many(actor: PoolActorHandle, parts: list[RunArgs]) -> list[RunReply]:
        return await actor.run_many.remote(parts)

    def worth_a_call(self, parts: list[RunArgs]) -> bool:
        """Whether queued sub-batches carry enough measured work to go out at once."""
        cost = self.task_cost()
        return cost is not None and cost * sum(len(p[1]) for p in parts) >= WORTH_A_CALL_S

    def detach(self, actor: PoolActorHandle) -> None:
        """Forget ``actor`` without stopping it (another process owns it)."""
        self.handles.pop(id(actor), None)
        self.node_of.pop(id(actor), None)
        self._worker_of.pop(id(actor), None)
        self._calls.forget(id(actor))

    def recycle(self, actor: PoolActorHandle) -> None:
        """Keep a lost actor for the next :meth:`start_actor`, which waits for Ray
        to restart it under the same actor id (and kills the old process first
        when it is still there)."""
        if not self._restartable:
            self.kill(actor)
            return
        was = self._worker_of.get(id(actor))
        self.detach(actor)
        self.handles[id(actor)] = actor  # ours until killed: a failed start kills it
        self._spares.append((actor, was))

    def kill(self, actor: PoolActorHandle) -> None:
        self.detach(actor)
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone is fine
            log.debug("ray.kill failed: %s", exc)

    async def end_session(self, actor: PoolActorHandle, session_id: str) -> None:
        try:
            await actor.end_session.remote(session_id)
        except self.lost_errors as exc:
            raise ActorLost(first_line(exc)) from exc

    async def retire(self, actor: PoolActorHandle) -> None:
        try:
            await actor.close_sessions.remote()
        except self.lost_errors as exc:
            raise ActorLost(first_line(exc)) from exc

    async def close(self) -> None:
        """End the calls still in flight (the pool kills the actors) and kill the
        lost actors no start took."""
        while self._spares:
            self.kill(self._spares.pop()[0])
        await self._calls.close()

    async def status(self, actor: PoolActorHandle, timeout_s: float) -> ActorInfo:
        ref = actor.status.remote()
        try:
            info = await asyncio.wait_for(ref, timeout_s)
        except asyncio.TimeoutError:
            # Cancelled, not left queued in the actor's control group, where it
            # would hold up the next status call and a replacement's ``ready``.
            try:
                self._ray.cancel(ref)
            except Exception as exc:  # already finished or gone is fine
                log.debug("ray.cancel failed: %s", exc)
            return {"error": f"no answer within {timeout_s:g} s"}
        except self.lost_errors as exc:
            return {"error": first_line(exc)}
        return info


def actor_key(actor: object) -> str:
    """A name of one actor (one incarnation) that is the same in every process
    holding a handle to it: Ray's actor id."""
    actor_id = getattr(actor, "_actor_id", None)
    hex_of = getattr(actor_id, "hex", None)
    return str(hex_of()) if callable(hex_of) else str(id(actor))


def as_shared_ref(shared: object) -> SharedRef | None:
    """Shared data reaches the actors only as a :class:`SharedRef` (or not at all)."""
    if shared is not None and not isinstance(shared, SharedRef):
        raise TypeError(f"shared data reaches the actors as a SharedRef, not {shared!r}")
    return shared


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else describe(exc)
