"""A node bridge: the bridge of one node of a cluster, in a Ray actor pinned there.

The coordinator (the CLI's :class:`~ray_alpcrun.bridge.actor.Bridge`) starts one
for every other node that hosts pool actors and hands it that node's actors
(:meth:`NodeBridge.adopt`). The node bridge registers the node's logical workers
with the queue manager under the node's own identity, reads shared data from
the node cache as the node sees ``--cache`` (``localhost:3337`` is this node's
cache), and reaches its actors over their Unix sockets: every batch of the node
stays on the node. It owns no actor: one that dies or hangs here is reported to
the coordinator, which kills and replaces it. See docs/deployment.md, "A bridge
on every node".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import asdict, replace
from typing import Any, cast

from ray_alpcrun.bridge.actor import Bridge
from ray_alpcrun.bridge.answerbook import Key
from ray_alpcrun.bridge.figures import slots_in_flight, worker_figures
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import STAT_FIELDS
from ray_alpcrun.config import Env, PoolConfig, default_node, default_pod
from ray_alpcrun.handler import HandlerSpec
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.interfaces import Availability
from ray_alpcrun.pool.node_pool import NodePool
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)

# After an actor here is lost, the node keeps as many logical workers as it had
# for this long: its replacement usually comes within seconds, and a logical
# worker drained meanwhile costs the batches of its window one delivery each
# (issue 23's outside chaos run, seed 7, on 2026-12-02: 1.71 % of the tasks
# dead-lettered as "delivered 3 times", 0.83 % with the hold; two runs on a
# slower day, 2026-12-07, did not show the gain: 3.21 % without, 3.58 % with).
SLOT_HOLD_S = 10.0
# A node with no live actor for this long gives back what its logical workers
# hold when they drain (retired, or the coordinator stops the empty node's
# bridge) instead of waiting out the drain timeout: no actor will come to run it.
# The CI chaos run of 2026-12-07 stalled on that: two batches waited 90 s on a
# node the shrinking pool had left.
GIVE_BACK_AFTER_S = SLOT_HOLD_S
# A peer that keeps a batch's answer has this long to hand it over (else it runs here).
FETCH_TIMEOUT_S = 5.0


def node_settings(settings: WorkerSettings, env: Env) -> WorkerSettings:
    """The coordinator's settings as this node sees them: its own identity, from
    this process's environment (Ray actors inherit their raylet's: a node started
    with ``METALCORE_WORKER_NODE`` set names its bridge so), else its host name and a
    pod name of its own. ``--cache`` is used as given: ``localhost`` is this node."""
    return replace(
        settings,
        node=env.worker_node or default_node(),
        pod=env.worker_pod or default_pod(),
        slots=1,  # then one per live actor here (NodeBridge.follow_slots)
    )


class NodeBridge(Bridge):
    """Runs inside the node's Ray actor (see :func:`node_bridge_class`)."""

    def __init__(
        self,
        handler: HandlerSpec,
        pool_config: PoolConfig,
        settings: WorkerSettings,
        coordinator: Any,
        log_level: str = "info",
        log_json: bool = False,
        fixed_slots: int | None = None,
    ) -> None:
        super().__init__(
            handler, pool_config, node_settings(settings, Env.read()), log_level, log_json
        )
        self.coordinator = coordinator
        # None: one logical worker per live actor on this node (the default).
        self.fixed_slots = fixed_slots
        self.exports_metrics = False  # the coordinator exports the deployment's figures
        self._reports: set[asyncio.Future[Any]] = set()
        self._holds: list[tuple[float, int]] = []  # (until, logical workers then)
        self._no_actor: asyncio.TimerHandle | None = None  # GIVE_BACK_AFTER_S pending
        self._had_actor = False  # one was handed over: take work (update_intake)

    def _on_pool(self, availability: Availability) -> None:
        super()._on_pool(availability)
        worker = self.worker
        if worker is None:
            return
        # First called once the worker is set (its link is open): ask peers first.
        worker.link.answers.fetch = self._fetch_kept
        if availability.live > 0:
            worker.give_back.clear()
            if self._no_actor is not None:
                self._no_actor.cancel()
                self._no_actor = None
        elif self._no_actor is None and not worker.give_back.is_set():
            loop = asyncio.get_running_loop()
            self._no_actor = loop.call_later(GIVE_BACK_AFTER_S, self._still_no_actor)

    def update_intake(self) -> None:
        """As the coordinator's, except that no logical worker registers before the
        first actor is handed over: batches taken meanwhile would wait in flight for
        it, each a delivery the next fault can cost (the outside chaos run: node
        bridges registered and were bound ~0.1-0.3 s before their actors came, and
        after a restart those are the batches re-queued before)."""
        worker, pool = self.worker, self.pool
        if not self._had_actor and worker is not None and pool is not None:
            if pool.availability().live == 0:
                worker.pause("no actor handed over to this node bridge yet")
                return
            self._had_actor = True
        super().update_intake()

    def _still_no_actor(self) -> None:
        self._no_actor = None
        pool, worker = self.pool, self.worker
        if pool is not None and worker is not None and pool.live == 0:
            log.info("no actor on this node for %g s: draining gives back what it holds",
                     GIVE_BACK_AFTER_S)  # fmt: skip
            worker.give_back.set()

    def make_pool(self) -> NodePool:
        return NodePool(self.pool_config, self._report_lost)

    def _report_lost(self, index: int, key: str, reason: str, killed: bool) -> None:
        worker = self.worker
        if worker is not None and not self.draining:
            loop = asyncio.get_running_loop()
            active = sum(1 for slot in worker.slots if not slot.retired)
            self._holds.append((loop.time() + SLOT_HOLD_S, active))
            loop.call_later(SLOT_HOLD_S + 0.05, self.follow_slots)  # then shrink if still due
        report = self.coordinator.member_lost.remote(index, key, reason, killed)
        ref = asyncio.ensure_future(report)
        self._reports.add(ref)
        ref.add_done_callback(self._reported)

    def _reported(self, ref: asyncio.Future[Any]) -> None:
        self._reports.discard(ref)
        if not ref.cancelled() and ref.exception() is not None:
            log.warning(
                "could not report a lost actor to the coordinator",
                extra=fields(error=str(ref.exception())),
            )

    def wanted_slots(self) -> int | None:
        """One logical worker per live actor here (at least one), unless fixed; for
        ``SLOT_HOLD_S`` after an actor here was lost, no fewer than there were."""
        pool = self.pool
        if pool is None:
            return None
        if self.fixed_slots:
            return self.fixed_slots
        now = asyncio.get_running_loop().time()
        self._holds = [(until, n) for until, n in self._holds if until > now]
        held = max((n for _, n in self._holds), default=0)
        return max(1, pool.live, held)

    async def adopt(self, index: int, actor: Any) -> bool:
        """Serve ``actor`` as pool member ``index``; True when it is on its socket."""
        await self.wait_serving()
        pool = self.pool
        if not isinstance(pool, NodePool):
            return False
        direct = await pool.adopt(index, actor)
        self.update_intake()  # the first one: take work (and follow the count)
        log.info("actor handed over", extra=fields(actor=index, direct=direct))
        return direct

    async def forget(self, index: int) -> int:
        """Stop serving member ``index`` (released or replaced); its calls here finish first."""
        pool = self.pool
        if not isinstance(pool, NodePool):
            return 0
        left = await pool.forget(index)
        self.follow_slots()
        return left

    async def kept_answer(self, key: Key) -> list[Outcome] | None:
        """The outcomes of a batch whose stream broke here (a peer got it), once
        computed; None if this node has none."""
        worker = self.worker
        return None if worker is None else await worker.link.answers.outcomes(key)

    async def _fetch_kept(self, holder: Any, key: Key) -> list[Outcome] | None:
        try:
            got = await asyncio.wait_for(holder.kept_answer.remote(key), FETCH_TIMEOUT_S)
        except Exception as exc:  # the holder is gone or slow: run the batch here
            log.debug("kept answer not fetched: %s", exc)
            return None
        if got is not None and self.worker is not None:
            self.worker.stats.batches_answered_again += 1
            log.info("batch delivered again: answered from what another node kept",
                     extra=fields(session=key[0], batch=key[1]))  # fmt: skip
        return cast("list[Outcome] | None", got)

    async def load(self, elsewhere: list[tuple[list[Key], Any]] | None = None) -> dict[str, Any]:
        """What the coordinator polls: load, logical workers, counters (``stats``,
        summed into the coordinator's ``/metrics``), batches in flight per logical
        worker, the latency histogram's counts, readiness; ``kept``: the batches
        whose delivery here ended unanswered since the last poll (their streams
        broke). It brings ``elsewhere``: such batches of other nodes, and their handles."""
        pool, worker = self.pool, self.worker
        out: dict[str, Any] = {
            "node": self.settings.node,
            "pod": self.settings.pod,
            "registered": 0,
            "ready": False,
            "stats": {},
        }
        if isinstance(pool, NodePool):
            out.update(pool.load())
            out["availability"] = asdict(pool.availability())
        if worker is not None:
            for keys, holder in elsewhere or ():
                worker.link.answers.learn(keys, holder)
            out["kept"] = worker.link.answers.take_published()
            out["registered"] = sum(s.registered.is_set() for s in worker.slots)
            stats = worker.stats
            out["stats"] = {name: getattr(stats, name) for name in STAT_FIELDS}
            out["stats"].update(worker_figures(worker))
            out["slots_in_flight"] = slots_in_flight(worker)
            out["latency"] = stats.latency.snapshot()
            ready, why = await self._ready()
            out["ready"], out["ready_text"] = ready, why
        return out


@functools.cache
def node_bridge_class() -> Any:
    """The Ray actor class for :class:`NodeBridge` (imports Ray on first use).

    Made once per process: each ``ray.remote`` class is pickled and exported
    anew, and the coordinator starts a node bridge for every node bridge that
    died (the chaos run's memory trace found one export per replacement)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0, max_concurrency=1000)(
        NodeBridge
    )
