"""The coordinator's pool when a bridge runs on every node (``--bridges per-node``).

One :class:`~ray_alpcrun.pool.membership.Membership` decides which actors exist
across the cluster (Ray places them; pending ones are the autoscaler's demand);
the node bridges serve the actors on their nodes
(:mod:`ray_alpcrun.bridge.nodes`). :class:`ClusterPool` is the
:class:`~ray_alpcrun.pool.actor_pool.ActorPool` that makes this possible:

* its own dispatcher sees only the actors on the coordinator's node
  (:class:`LocalView`), or all of them while it has none there: the batches of
  its placeholder logical worker then run wherever actors are, over ordinary calls;
* the elastic pool scales on the load of every bridge (``elsewhere_load``) and
  releases only actors idle everywhere (``busy_elsewhere_of``); a node bridge
  stops giving an actor work before the actor is released (``before_retire``);
* a node bridge reports the actors that died or hung there
  (:meth:`ClusterPool.member_lost`), named by index and actor id, so that a
  late report never kills the replacement at the same index.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.pool.actor_pool import ActorPool
from ray_alpcrun.pool.backend import RayBackend, actor_key
from ray_alpcrun.pool.direct import DirectBackend
from ray_alpcrun.pool.interfaces import Availability, Lifecycle, Listener, Member, Roster
from ray_alpcrun.pool.membership import Membership
from ray_alpcrun.pool.pool_actor import PoolActorHandle

A = TypeVar("A")

PROBE_TIMEOUT_S = 3.0


class LocalView(Generic[A]):
    """A :class:`Roster` of the members ``is_local`` accepts, or of all members
    while none is local."""

    def __init__(self, roster: Roster[A], is_local: Callable[[Member[A]], bool]) -> None:
        self._roster = roster
        self._is_local = is_local

    def members(self) -> list[Member[A]]:
        members = self._roster.members()
        return [m for m in members if self._is_local(m)] or members

    @property
    def pending(self) -> int:
        return self._roster.pending

    def availability(self) -> Availability:
        return self._roster.availability()

    def lost(self, member: Member[A], reason: str, *, killed: bool = False) -> None:
        self._roster.lost(member, reason, killed=killed)

    def watch(self, listener: Listener) -> Callable[[], None]:
        return self._roster.watch(listener)


class _Withdrawing:
    """The backend's life cycle, with a node bridge told before an actor is released."""

    def __init__(self, inner: RayBackend | DirectBackend, pool: ClusterPool) -> None:
        self._inner = inner
        self._pool = pool

    async def start_actor(self) -> PoolActorHandle:
        return await self._inner.start_actor()

    def kill(self, actor: PoolActorHandle) -> None:
        self._inner.kill(actor)

    def recycle(self, actor: PoolActorHandle) -> None:
        self._inner.recycle(actor)

    async def retire(self, actor: PoolActorHandle) -> None:
        await self._pool.before_retire(actor)
        await self._inner.retire(actor)


class ClusterPool(ActorPool):
    """An :class:`ActorPool` whose actors are served by the bridge of their node."""

    def __init__(self, handler: HandlerSpec, config: PoolConfig, own_node: str) -> None:
        super().__init__(handler, config)
        self.own_node = own_node
        self.elsewhere_load: Callable[[], int] = lambda: 0
        """Batches the node bridges hold (set by the coordinator)."""
        self.busy_elsewhere_of: Callable[[int], int] = lambda index: 0
        """Tasks in flight on member ``index`` in its node bridge."""
        self.before_retire: Callable[[PoolActorHandle], Awaitable[None]] = _nothing
        """Awaited before an actor is released (its node bridge lets it finish)."""

    def _lifecycle(self, backend: RayBackend | DirectBackend) -> Lifecycle[PoolActorHandle]:
        return _Withdrawing(backend, self)

    def _roster_of(self, membership: Membership[PoolActorHandle]) -> Roster[PoolActorHandle]:
        return LocalView(membership, self.is_local)

    def _busy_elsewhere(self, member: Member[PoolActorHandle]) -> int:
        return self.busy_elsewhere_of(member.index)

    def load(self) -> int:
        return super().load() + self.elsewhere_load()

    def node_of(self, member: Member[PoolActorHandle]) -> str | None:
        backend = self._backend
        return backend.node_of.get(id(member.actor)) if backend is not None else None

    def is_local(self, member: Member[PoolActorHandle]) -> bool:
        node = self.node_of(member)
        return node is None or node == self.own_node

    def members_with_nodes(self) -> list[tuple[Member[PoolActorHandle], str | None]]:
        membership = self._membership
        members = membership.members() if membership is not None else []
        return [(m, self.node_of(m)) for m in members]

    async def probe(self, member: Member[PoolActorHandle]) -> bool:
        """Whether the actor answers (a node bridge that served it died)."""
        backend = self._backend
        if backend is None:
            return False
        info = await backend.status(member.actor, PROBE_TIMEOUT_S)
        # One that Ray restarted by itself (its node was lost with the node bridge)
        # may be on another node now: replaced, so that the pool learns where it
        # is. (Taken as live, it kept the lost node wanted: the long chaos run
        # started 544 node bridges there, each failing "not schedulable".)
        return "error" not in info and backend.same_process(member.actor, info)

    def member_lost(self, index: int, key: str, reason: str, killed: bool) -> bool:
        """A node bridge lost member ``index`` (actor ``key``): replace it, unless
        that actor was replaced already. True when it was this pool's member."""
        membership = self._membership
        if membership is None:
            return False
        for member in membership.members():
            if member.index == index and actor_key(member.actor) == key:
                membership.lost(member, reason, killed=killed)
                return True
        return False


async def _nothing(actor: PoolActorHandle) -> None:
    return None
