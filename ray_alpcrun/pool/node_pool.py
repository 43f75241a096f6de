"""The actor pool of a node bridge: the actors on its node that the coordinator
created and handed over (:class:`~ray_alpcrun.pool.adopted.AdoptedRoster`),
reached over their Unix sockets (the direct path) and run by the same
:class:`~ray_alpcrun.pool.dispatch.Dispatcher` as every pool.

It offers what the bridge uses of an :class:`~ray_alpcrun.pool.actor_pool.ActorPool`
(run, end_session, shared data, status, availability) but never creates, kills
or replaces an actor: the coordinator owns them (so everything goes with the
CLI process), and hears of a member that died or hung here through
``report_lost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.pool.actor_pool import ActorPool, dispatcher_for
from ray_alpcrun.pool.adopted import AdoptedRoster
from ray_alpcrun.pool.backend import RayBackend, actor_key
from ray_alpcrun.pool.direct import DirectBackend
from ray_alpcrun.pool.dispatch import Dispatcher
from ray_alpcrun.pool.interfaces import Availability, Listener, Listeners, Member
from ray_alpcrun.pool.pool_actor import PoolActorHandle, SharedRef
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)

# A forgotten member's calls in flight get this long to finish before its socket closes.
FORGET_WAIT_S = 30.0

# (index, actor key, reason, killed): a member died or hung here.
ReportLost = Callable[[int, str, str, bool], None]


class NodePool:
    """Serves handed-over actors; see the module docstring."""

    def __init__(self, config: PoolConfig, report_lost: ReportLost) -> None:
        self.config = config
        self._report = report_lost
        self._backend: RayBackend | DirectBackend | None = None
        self._roster: AdoptedRoster[PoolActorHandle] | None = None
        self._dispatcher: Dispatcher[PoolActorHandle] | None = None
        self._listeners = Listeners()
        self.waiting_for = ""

    async def start(self) -> None:
        if self._roster is not None:
            return
        cfg = self.config
        calls = RayBackend(None, b"", cfg)  # type: ignore[arg-type]  # never starts actors
        backend: RayBackend | DirectBackend = (
            DirectBackend(calls) if cfg.data_path == "direct" else calls
        )
        roster: AdoptedRoster[PoolActorHandle] = AdoptedRoster(
            self._lost, grace_s=cfg.no_actor_grace_s
        )
        dispatcher = dispatcher_for(roster, backend, calls, cfg)
        self._backend, self._roster, self._dispatcher = backend, roster, dispatcher
        roster.watch(self._changed)

    def _lost(self, member: Member[Any], reason: str) -> None:
        if self._backend is not None:
            self._backend.detach(member.actor)  # its owner kills it; the socket goes now
        self._report(member.index, actor_key(member.actor), reason, member.killed)

    # -- what the coordinator says -------------------------------------------

    async def adopt(self, index: int, actor: PoolActorHandle) -> bool:
        """Serve ``actor`` as member ``index``; True when it goes over its socket."""
        backend, roster = self._backend, self._roster
        if backend is None or roster is None:
            return False
        direct = False
        if isinstance(backend, DirectBackend):
            direct = await backend.attach(actor)
        roster.adopt(index, actor)
        return direct

    async def forget(self, index: int, wait_s: float = FORGET_WAIT_S) -> int:
        """Stop giving member ``index`` work; wait (bounded) for its calls in flight
        here to finish, then close its socket. Returns the tasks still in flight."""
        roster, backend = self._roster, self._backend
        if roster is None or backend is None:
            return 0
        member = roster.forget(index)
        if member is None:
            return 0
        for _ in range(max(1, int(wait_s / 0.05))):  # bounded: a counter has no event
            if member.inflight <= 0:
                break
            await asyncio.sleep(0.05)  # ok: polls the dispatcher's counter
        backend.detach(member.actor)
        return member.inflight

    def load(self) -> dict[str, Any]:
        """What the coordinator polls: batches held and each member's tasks in flight."""
        d, r = self._dispatcher, self._roster
        return {
            "batches": d.batches if d is not None else 0,
            "inflight": {m.index: m.inflight for m in (r.members() if r else [])},
            "task_cost_s": d.task_cost_s if d is not None else None,
        }

    # -- what the bridge uses ------------------------------------------------

    @property
    def live(self) -> int:
        return len(self._roster.members()) if self._roster is not None else 0

    @property
    def pending(self) -> int:
        return 0

    @property
    def restarts(self) -> int:
        return 0  # counted where actors are replaced: the coordinator

    def availability(self) -> Availability:
        if self._roster is None:
            return Availability("waiting", "the node pool is not running")
        return self._roster.availability()

    def watch(self, listener: Listener) -> Callable[[], None]:
        return self._listeners.add(listener)

    def _changed(self, availability: Availability) -> None:
        self._listeners.notify(availability)

    # Shared data goes into the object store the same way as in every pool.
    put_shared = ActorPool.put_shared
    aput_shared = ActorPool.aput_shared

    async def run(
        self,
        session_id: str,
        payloads: Sequence[bytes],
        shared: SharedRef | None = None,
        tags: Sequence[str] = (),
    ) -> list[Outcome]:
        if self._dispatcher is None:
            raise RuntimeError("the node pool is not running")
        return await self._dispatcher.run(session_id, payloads, shared, tuple(tags))

    async def end_session(self, session_id: str) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.end_session(session_id)

    async def status(self, timeout_s: float = 5.0, max_age_s: float = 0.0) -> dict[str, Any]:
        roster, backend, d = self._roster, self._backend, self._dispatcher
        if roster is None or backend is None or d is None:
            return {"started": False, "live": 0, "actors": []}
        members = roster.members()
        infos = await asyncio.gather(*(backend.status(m.actor, timeout_s) for m in members))
        actors = [
            {"actor": m.index, "inflight": m.inflight, **info}
            for m, info in zip(members, infos, strict=True)
        ]
        return {"started": True, "live": len(members), "batches": d.batches, "actors": actors}

    def scale_status(self) -> dict[str, Any]:
        d = self._dispatcher
        return {
            "elastic": self.config.elastic,
            "min_actors": self.config.lowest,
            "max_actors": self.config.highest,
            "pending": 0,
            "target": self.live,
            "reason": "actors handed over by the coordinator",
            "batches": d.batches if d is not None else 0,
            "released": 0,
            "released_under_load": 0,
            "requested": 0,
            "waiting_for": "",
        }

    async def close(self) -> None:
        """Close the sockets; the actors live on (the coordinator owns them)."""
        roster, self._roster = self._roster, None
        self._dispatcher = None
        if roster is not None:
            roster.close()
        backend, self._backend = self._backend, None
        if backend is not None:
            await backend.close()
