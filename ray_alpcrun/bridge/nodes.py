"""The coordinator's side of per-node bridges (``--bridges per-node``).

The coordinator is the CLI's :class:`~ray_alpcrun.bridge.actor.Bridge`: its pool
decides which actors exist (one elastic pool across the cluster; Ray places the
actors). :class:`NodeBridges` keeps one :class:`~ray_alpcrun.bridge.node.NodeBridge`
on every other node that hosts pool actors and hands it that node's actors:

* a node's first actor starts its node bridge (pinned to the node, owned by
  the coordinator: it goes when the CLI goes); later actors are handed over as
  they join, and forgotten when they die, are replaced or are released (the
  node bridge lets their calls in flight finish first);
* a node bridge that dies (killed, or its node lost) is replaced while its node
  still has live actors; actors that died with it are found by asking each one,
  and replaced;
* a node with no actor left for ``EMPTY_NODE_S`` has its bridge drained (like an
  UNBIND) and stopped, so that the autoscaler can remove the idle node;
* every ``POLL_S`` the coordinator reads each node bridge's load (batches held,
  tasks in flight per actor: the elastic pool scales on the sum, and releases
  only actors idle everywhere), counters (summed into ``/metrics``) and readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ray_alpcrun.bridge.answerbook import KEEP_S
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import COUNTER_FIELDS, BridgeStats, summed
from ray_alpcrun.config import PoolConfig
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.backend import actor_key

log = logging.getLogger(__name__)

POLL_S = 0.25
EMPTY_NODE_S = 10.0
# The placeholder stays retired this long after the last node bridge worker was seen.
PLACEHOLDER_HOLD_S = 30.0
# At start, with live actors on other nodes, the placeholder waits this long for
# their node bridges to register instead of registering itself: it took the front
# of the queue after every CLI restart (the batches re-queued before, delivered
# once more) and drained them again a second later (the outside chaos run).
START_HOLD_S = 10.0
# A call to a node bridge that takes longer than this counts as no answer.
CALL_TIMEOUT_S = 10.0


@dataclass
class _Node:
    """One node bridge and what the coordinator knows of it."""

    node_id: str
    handle: Any
    run_ref: asyncio.Future[Any]
    adopted: dict[int, Any] = field(default_factory=dict)  # index -> Member
    load: dict[str, Any] = field(default_factory=dict)
    empty_since: float | None = None
    stopping: bool = False
    dead: bool = False
    name: str = ""
    syncing: asyncio.Task[None] | None = None  # its hand-overs and load poll, under way
    told: int = 0  # the last report of kept answers passed to it (NodeBridges._kept)


class NodeBridges:
    """Node bridges for the actors of ``pool`` that are not on ``own_node``."""

    def __init__(
        self,
        pool: Any,  # the coordinator's ActorPool
        own_node: str,
        coordinator: Any,  # the coordinator's own actor handle (node bridges report to it)
        handler: HandlerSpec,
        pool_config: PoolConfig,
        settings: WorkerSettings,
        log_level: str,
        log_json: bool,
        fixed_slots: int | None,
        bridge_class: Callable[[], Any],
    ) -> None:
        self._pool = pool
        self._bridge_class = bridge_class  # node.node_bridge_class (no import: no cycle)
        self._own = own_node
        self._coordinator = coordinator
        self._args = (handler, pool_config, settings)
        self._log = (log_level, log_json)
        self._fixed_slots = fixed_slots
        self._nodes: dict[str, _Node] = {}
        self._gone: set[str] = set()  # nodes Ray could not place a node bridge on: lost
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._kick = asyncio.Event()
        self._closed = False
        self._served_at: float | None = None  # last time a node bridge had a worker registered
        self._started_at = float("-inf")  # start() with actors elsewhere: their bridges come
        # What node bridges reported kept unsent: (seq, when, node, keys, holder handle).
        self._kept: deque[tuple[int, float, str, list[Any], Any]] = deque()
        self._seq = 0
        # What ended node bridges counted (their last poll), per node name: the
        # deployment's counters never go back when a node bridge dies or stops.
        self._ended_counts: dict[str, dict[str, int]] = {}
        self.replaced = 0
        """Node bridges started again after theirs died."""
        self.stopped_empty = 0
        """Node bridges drained and stopped because their node had no actor left."""
        self.on_change: Callable[[], None] = lambda: None
        """Called after every poll (the coordinator re-decides whether it takes work)."""
        self.polled = asyncio.Event()
        """Set after every poll (cleared by whoever waits for the next)."""

    # -- the figures the coordinator uses -------------------------------------

    @property
    def batches(self) -> int:
        """Batches held by the node bridges (the elastic pool's load, beside its own)."""
        return sum(int(n.load.get("batches", 0)) for n in self._live())

    @property
    def registered(self) -> int:
        """Logical workers the node bridges have registered now."""
        return sum(int(n.load.get("registered", 0)) for n in self._live())

    def serve_elsewhere(self) -> bool:
        """Whether node bridges serve the pool, so that the coordinator's placeholder
        takes no work: one has a logical worker registered, or had within
        ``PLACEHOLDER_HOLD_S`` (a moment without one, while a node bridge is
        replaced or resizes, must not register the placeholder again: each
        placeholder that drains leaves its batches to be delivered once more)."""
        now = asyncio.get_running_loop().time()
        if self.registered > 0:
            self._served_at = now
        if self._served_at is not None and now - self._served_at < PLACEHOLDER_HOLD_S:
            return True
        return now < self._started_at + START_HOLD_S and self.serves_remote()

    def any_ready(self) -> bool:
        return any(n.load.get("ready") for n in self._live())

    def describe_ready(self) -> str:
        ready = [n for n in self._live() if n.load.get("ready")]
        return f"{len(ready)} of {len(self._live())} ready, {self.registered} slot(s) registered"

    def has_local_actors(self) -> bool:
        return self.local_live() > 0

    def local_live(self) -> int:
        """Live pool actors on the coordinator's own node."""
        return sum(node == self._own for _, node in self._pool.members_with_nodes())

    def serves_remote(self) -> bool:
        """Whether a live pool actor is on another node (a node bridge serves it)."""
        return any(node not in (None, self._own) for _, node in self._pool.members_with_nodes())

    def summed(self, own: BridgeStats) -> BridgeStats:
        live = self._live()
        latencies = [n.load["latency"] for n in live if "latency" in n.load]
        counts = [n.load.get("stats", {}) for n in live] + list(self._ended_counts.values())
        return summed(own, counts, latencies)

    async def withdraw_actor(self, actor: Any) -> None:
        """Before ``actor`` is released: its node bridge stops giving it work."""
        key = actor_key(actor)
        for n in self._live():
            for index, member in list(n.adopted.items()):
                if actor_key(member.actor) == key:
                    del n.adopted[index]
                    await self._call(n, n.handle.forget.remote(index))

    def stats_sum(self, name: str) -> int:
        live = sum(int(n.load.get("stats", {}).get(name, 0)) for n in self._live())
        return live + sum(c.get(name, 0) for c in self._ended_counts.values())

    def ended_counts(self) -> dict[str, dict[str, int]]:
        """Per node name, the counters of its node bridges that ended (as last polled)."""
        return self._ended_counts

    def _count_ended(self, n: _Node) -> None:
        """Keep what node bridge ``n`` counted; called once, as it stops being live."""
        stats, node = n.load.get("stats", {}), n.load.get("node")
        if stats and node:
            into = self._ended_counts.setdefault(str(node), {})
            for name in COUNTER_FIELDS:
                into[name] = into.get(name, 0) + int(stats.get(name, 0))

    def served_elsewhere(self, index: int) -> int:
        """Tasks in flight on member ``index`` in its node bridge (last poll)."""
        for n in self._live():
            inflight = n.load.get("inflight", {})
            if index in inflight:
                return int(inflight[index])
        return 0

    def describe(self) -> list[dict[str, Any]]:
        """One entry per node bridge, for /status."""
        out = []
        for n in self._nodes.values():
            load = n.load
            out.append({
                "name": n.name, "node_id": n.node_id, "node": load.get("node"),
                "pod": load.get("pod"),
                "actors": sorted(n.adopted), "registered": load.get("registered", 0),
                "batches": load.get("batches", 0), "ready": bool(load.get("ready")),
                "ready_text": load.get("ready_text", "starting"), "stopping": n.stopping,
                "dead": n.dead, "slots_in_flight": load.get("slots_in_flight", []),
                **{k: v for k, v in load.get("stats", {}).items()},
            })  # fmt: skip
        return out

    def _live(self) -> list[_Node]:
        return [n for n in self._nodes.values() if not n.dead]

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        if self.serves_remote():  # not for a pool scaling from zero: its placeholder asks
            self._started_at = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._loop(), name="node-bridges")
        self._pool.watch(lambda _availability: self._kick.set())

    async def close(self, drain: bool) -> None:
        """Stop every node bridge (draining its batches first when ``drain``)."""
        self._closed = True
        syncs = [n.syncing for n in self._nodes.values() if n.syncing is not None]
        tasks = [t for t in [self._task, *self._tasks, *syncs] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        nodes = list(self._nodes.values())
        await asyncio.gather(*(self._stop(n, drain) for n in nodes), return_exceptions=True)

    async def _loop(self) -> None:
        while not self._closed:
            try:
                await self._sync()
            except Exception as exc:  # one bad round must not end the deployment
                log.warning("node bridges: sync failed", extra=fields(error=str(exc)))
            self.on_change()
            self.polled.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), POLL_S)
            self._kick.clear()

    async def _sync(self) -> None:
        """One round: node bridges started for new nodes and for dead ones (at
        once), and each node's own sync started unless its last one still runs:
        a node bridge that does not answer (starting: its ``adopt`` waits until it
        serves; or stuck) holds up only its own node."""
        now = asyncio.get_running_loop().time()
        wanted: dict[str, dict[int, Any]] = {}
        for member, node_id in self._pool.members_with_nodes():
            if node_id is not None and node_id != self._own:
                wanted.setdefault(node_id, {})[member.index] = member
        for node_id, n in list(self._nodes.items()):
            if n.dead:
                del self._nodes[node_id]
                if n.syncing is not None:
                    n.syncing.cancel()
        # Not on a lost node, whose actors stay wanted there until their probe ends.
        for node_id in wanted.keys() - self._nodes.keys() - self._gone:
            self._nodes[node_id] = self._spawn(node_id, now)
        for node_id, n in self._nodes.items():
            if n.syncing is None or n.syncing.done():
                n.syncing = asyncio.create_task(self._sync_node(n, wanted.get(node_id, {}), now))

    async def _sync_node(self, n: _Node, members: dict[int, Any], now: float) -> None:
        try:
            await self._hand_over(n, members, now)
        except Exception as exc:  # one bad round must not end the deployment
            log.warning("node bridges: sync failed",
                        extra=fields(node_id=n.node_id, error=str(exc)))  # fmt: skip

    async def _hand_over(self, n: _Node, members: dict[int, Any], now: float) -> None:
        node_id = n.node_id
        if not n.dead:
            for index, member in list(n.adopted.items()):
                if members.get(index) is not member:
                    del n.adopted[index]
                    await self._call(n, n.handle.forget.remote(index))
            for index, member in members.items():
                if n.adopted.get(index) is not member:
                    n.adopted[index] = member
                    await self._call(n, n.handle.adopt.remote(index, member.actor))
            news = self._kept_news(n, now)
            load = await self._call(n, n.handle.load.remote(news))
            if isinstance(load, dict):
                n.load = load
                if load.get("kept"):
                    self._seq += 1
                    self._kept.append((self._seq, now, n.node_id, load["kept"], n.handle))
        if members or n.stopping or n.dead:
            n.empty_since = None
        elif n.empty_since is None:
            n.empty_since = now
        elif now - n.empty_since >= EMPTY_NODE_S:
            n.stopping = True
            log.info("node bridge: its node has no actor left; draining it",
                     extra=fields(node_id=node_id))  # fmt: skip
            self._own_task(self._stop_and_forget(n))

    def _kept_news(self, n: _Node, now: float) -> list[tuple[list[Any], Any]]:
        """What the other node bridges reported kept since ``n`` was last told
        (bridge.answerbook: a batch whose stream broke is answered from it)."""
        while self._kept and now - self._kept[0][1] > KEEP_S:  # as long as a node keeps them
            self._kept.popleft()
        news = [(keys, holder) for seq, _, node_id, keys, holder in self._kept
                if seq > n.told and node_id != n.node_id]  # fmt: skip
        n.told = self._seq
        return news

    def _spawn(self, node_id: str, now: float) -> _Node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        handler, pool_config, settings = self._args
        here = NodeAffinitySchedulingStrategy(node_id, soft=False)
        name = f"alpcrun-node-bridge-{self._own[:8]}-{node_id[:12]}-{int(now * 1000) % 100000}"
        cls = self._bridge_class().options(scheduling_strategy=here, name=name)
        handle = cls.remote(
            handler, pool_config, settings, self._coordinator, *self._log, self._fixed_slots
        )
        run_ref = asyncio.ensure_future(handle.run.remote())
        n = _Node(node_id, handle, run_ref, name=name)
        run_ref.add_done_callback(lambda ref: self._ended(n, ref))
        log.info("node bridge started", extra=fields(node_id=node_id))
        return n

    def _ended(self, n: _Node, ref: asyncio.Future[Any]) -> None:
        # Retrieved first: a bridge killed while it stops ends with ActorDiedError,
        # which asyncio would log as "never retrieved" (seen in the chaos run).
        import ray

        error = ref.exception() if not ref.cancelled() else None
        if isinstance(error, ray.exceptions.ActorUnschedulableError):  # a node id never comes back
            self._gone.add(n.node_id)
        if n.stopping or self._closed:
            return
        n.dead = True
        self._count_ended(n)
        reason = str(error).splitlines()[0] if error else f"run ended: {ref.result()!r}"
        log.warning("node bridge ended; replacing it",
                    extra=fields(node_id=n.node_id, reason=reason))  # fmt: skip
        self.replaced += 1
        self._own_task(self._probe(list(n.adopted.values())))

    def _own_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._kick.set()
        if not task.cancelled() and task.exception() is not None:
            log.warning("node bridges: %s", task.exception())

    async def _probe(self, members: list[Any]) -> None:
        """Ask each actor the dead node bridge served; report the dead ones lost."""
        answers = await asyncio.gather(
            *(self._pool.probe(m) for m in members), return_exceptions=True
        )
        for member, alive in zip(members, answers, strict=True):
            if alive is not True:
                key = actor_key(member.actor)
                self._pool.member_lost(member.index, key, "lost with its node bridge", False)

    async def _stop_and_forget(self, n: _Node) -> None:
        await self._stop(n, drain=True)
        self.stopped_empty += 1
        if self._nodes.get(n.node_id) is n:
            del self._nodes[n.node_id]
            if not n.dead:
                self._count_ended(n)

    async def _stop(self, n: _Node, drain: bool) -> None:
        import ray

        n.stopping = True
        try:
            await asyncio.wait_for(n.handle.stop.remote(drain), CALL_TIMEOUT_S * 3)
            await asyncio.wait_for(asyncio.shield(n.run_ref), CALL_TIMEOUT_S * 3)
            final = await asyncio.wait_for(n.handle.load.remote(), CALL_TIMEOUT_S)
            if isinstance(final, dict):
                n.load = final  # its counters up to its end (the drain included)
        except Exception as exc:
            log.debug("node bridge stop: %s", exc)
        finally:
            ray.kill(n.handle, no_restart=True)

    async def _call(self, n: _Node, ref: Any) -> Any:
        try:
            return await asyncio.wait_for(ref, CALL_TIMEOUT_S)
        except Exception as exc:  # a dead node bridge is noticed by its run_ref
            log.debug("node bridge call failed: %s", exc)
            return None


async def wait_registered(worker: Any, nodes: NodeBridges | None, timeout_s: float) -> None:
    """Until every logical worker of the coordinator's ``worker`` is registered, or
    one of a node bridge's is (the placeholder waits for them at start: START_HOLD_S).
    Raises TimeoutError after ``timeout_s``."""

    async def theirs(nodes: NodeBridges) -> None:
        while nodes.registered == 0:
            nodes.polled.clear()
            await nodes.polled.wait()

    waits = [asyncio.ensure_future(worker.wait_registered(timeout_s))]
    if nodes is not None:
        waits.append(asyncio.ensure_future(theirs(nodes)))
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    if not done:
        raise asyncio.TimeoutError(f"no logical worker registered within {timeout_s:g} s")
    done.pop().result()


def start_node_bridges(bridge: Any) -> NodeBridges:
    """Node bridges for a coordinator ``bridge`` (a Bridge with a ClusterPool)."""
    import ray

    pool, cfg = bridge.pool, bridge.pool_config
    nodes = NodeBridges(
        pool,
        pool.own_node,
        ray.get_runtime_context().current_actor,
        bridge.handler,
        cfg,
        bridge.settings,
        cfg.log_level or "info",
        cfg.log_json,
        bridge.fixed_slots,
        bridge.node_bridge_class,
    )
    pool.elsewhere_load = lambda: nodes.batches
    pool.busy_elsewhere_of = nodes.served_elsewhere
    pool.before_retire = nodes.withdraw_actor
    nodes.on_change = bridge.update_intake
    nodes.start()
    return nodes
