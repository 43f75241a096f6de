"""The compiled-graph data path: sub-batches reach pool actors over Ray Compiled Graphs.

An ordinary Ray actor call costs the bridge about half a millisecond of CPU
(task submission, scheduling, reply); a call through a compiled graph
(``ray.dag``) writes the arguments into a shared-memory channel that the actor
is already reading, and costs tens of microseconds. :class:`CompiledBackend` is
a dispatcher :class:`~ray_alpcrun.pool.membership.Backend` that sends sub-batches that
way and falls back to ordinary calls (the wrapped ``RayBackend``) whenever no
graph is up.

Design (checked against Ray 2.60):

* **One graph per actor**: ``InputNode -> actor.step -> output``, compiled with
  ``experimental_compile(enable_asyncio=True)`` and driven with
  ``await dag.execute_async(request)``. Per-actor graphs fail alone: an actor
  that dies takes down its own graph only, and actors can come and go (the
  elastic pool) without recompiling the others. ``step`` takes
  ``("run", [RunArgs, ...])`` (several sub-batches that queued for the actor
  travel together, as with :mod:`ray_alpcrun.pool.coalesce`) or ``("end", session)``.
* **In flight**: a :class:`~ray_alpcrun.pool.coalesce.Coalescer` keeps
  ``MAX_OUTSTANDING`` executions per actor in flight (the actor finds the next
  request waiting) and merges what queues meanwhile; Ray's
  ``_max_inflight_executions`` is set above that, so it never refuses one.
* **Ordinary calls meanwhile**: Ray runs a graph's loop on the actor's
  ``_ray_system`` thread, so ordinary calls still reach the actor (``ready``,
  ``status``, and ``run`` before the graph is up). The actor guards its handler
  with a lock, so a call and a graph step never run the handler concurrently.
  A graph is built on the first sub-batch for an actor that has lived
  ``_STABLE_S``; until it is up sub-batches go as ordinary calls. The compile
  blocks the event loop (~0.1-0.3 s: Ray's asyncio graph must be made on the
  loop, and it calls the actor), so it waits until the actor's ordinary calls
  have finished (a probe queued behind them answers), and actors replaced again
  and again do not pay it each time.
* **Failure**: Ray answers only the first execution of a graph whose actor died
  (with an odd error) and leaves the rest hanging. So every execution of a graph
  waits on its reply *or* the graph's ``broken`` event, set by any channel error,
  by the end of the actor's graph loop (its ObjectRef is awaited) and by
  :meth:`kill` (the dispatcher's timeout for hung actors). Waiting executions
  then raise :class:`~ray_alpcrun.errors.ActorLost`, so the dispatcher retries
  their sub-batches on live actors exactly as for ordinary calls, replaces the
  actor, and the next sub-batch for the replacement builds its graph.
  Errors raised by ``step`` itself are answered per sub-batch, as ordinary calls.
* **Idle**: Ray's channel readers wait by spinning (measured on a 2-core box:
  ~90 % of a core in the bridge and 25-60 % in the actor, per idle graph), so a
  graph lives only while there is work: one unused for ``idle_s`` is torn down
  (in a thread; teardown blocks) and rebuilt when work comes back.

Measured on a quiet 2-core box (``benchmarks/profile_bridge.py``, noop, one
actor, CPU per 1,000 tasks in bridge + actor; README "Performance"): batch 1,
830 tasks/s at 760 + 550 ms against 1,000 at 600 + 230 ms for ordinary calls
(which coalesce the batches queued behind the call in flight); batch 100, 40,000
at 14 + 14 ms against 46,700 at 12 + 5 ms; batch 1000, 89,300 at 7.1 + 5.4 ms
against 83,100 at 5.6 + 1.9 ms. Ray's channel threads spin while they wait,
one in the bridge and one in the actor per graph, and on a machine without
spare cores they take the CPU the queue manager, the client and the handlers
need (the shared workload with 4 actors on 2 cores ran at a fifth of the calls
path). So this path is opt-in with ``--data-path compiled``, for machines with
a spare core per graph; the default is :mod:`.direct` (a Unix socket per
actor, nothing spinning).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from ray_alpcrun.errors import ActorLost
from ray_alpcrun.pool.backend import as_shared_ref
from ray_alpcrun.pool.coalesce import Coalescer
from ray_alpcrun.pool.membership import CallResult
from ray_alpcrun.pool.pool_actor import (
    ActorInfo,
    CompiledGraph,
    PoolActorHandle,
    RunArgs,
    RunReply,
    StepReply,
)
from ray_alpcrun.runtime import describe

if TYPE_CHECKING:
    from ray_alpcrun.pool.backend import RayBackend

log = logging.getLogger(__name__)

T = TypeVar("T")
# What one execution carries: sub-batches to run, or a session to end.
_Request = tuple[Literal["run"], list[RunArgs]] | tuple[Literal["end"], str]

MAX_OUTSTANDING = 2
"""Executions in flight per actor; more sub-batches wait and travel together."""
_MAX_INFLIGHT = 8  # Ray's cap: above MAX_OUTSTANDING plus session ends
DEFAULT_IDLE_S = 1.0
_BUILD_RETRY_S = 30.0
# An actor gets a graph once it has lived this long: compiling blocks the event loop,
# and an actor replaced again and again (crashing tasks) would pay it every time.
_STABLE_S = 2.0  # after a failed compile, ordinary calls only for this long


@dataclass(eq=False)
class _Graph:
    """One actor's compiled graph and the executions waiting on it."""

    dag: CompiledGraph
    ready: bool = False
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    idle_timer: asyncio.TimerHandle | None = None
    closed: asyncio.Future[None] | None = None  # set once teardown finished


class CompiledBackend:
    """A :class:`~ray_alpcrun.pool.membership.Backend` that sends sub-batches over compiled graphs.

    ``calls`` is the ordinary backend (``ray_alpcrun.pool.backend.RayBackend``): it
    starts, kills and queries actors and carries sub-batches while no graph is up.
    """

    def __init__(self, calls: RayBackend, *, idle_s: float = DEFAULT_IDLE_S) -> None:
        import ray

        self._ray = ray
        self._inner = calls
        self._idle_s = idle_s
        self._lost: tuple[type[BaseException], ...] = (
            ray.exceptions.RayActorError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.RayChannelError,
        )
        self._graphs: dict[int, _Graph] = {}
        self._no_build_until: dict[int, float] = {}
        self._born: dict[int, float] = {}  # when each actor started
        self._builds: dict[int, asyncio.Event] = {}  # set when the build ended
        self._calls_out: dict[int, int] = {}  # ordinary calls in flight per actor
        self._drain: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._steps: Coalescer[PoolActorHandle, RunArgs, RunReply] = Coalescer(
            self._send_one, self._send_many, MAX_OUTSTANDING
        )
        self.builds = 0
        """Graphs compiled so far (for tests and statistics)."""
        self.teardowns = 0

    @property
    def handles(self) -> dict[int, PoolActorHandle]:
        return self._inner.handles

    @property
    def sends(self) -> int:
        """Graph executions sent so far (each may carry several sub-batches)."""
        return self._steps.calls

    def graph_ready(self, actor: PoolActorHandle) -> bool:
        """Whether sub-batches for ``actor`` go through its compiled graph now."""
        graph = self._graphs.get(id(actor))
        return graph is not None and graph.ready and not graph.broken.is_set()

    async def start_actor(self) -> PoolActorHandle:
        actor = await self._inner.start_actor()
        self._born[id(actor)] = time.monotonic()
        return actor

    async def call(
        self,
        actor: PoolActorHandle,
        session_id: str,
        payloads: list[bytes],
        shared: object,
        tags: tuple[str, ...],
    ) -> CallResult:
        key = id(actor)
        while not self.graph_ready(actor):
            build = self._builds.get(key)
            if build is None:
                self._maybe_build(actor)  # this call goes ordinary; later ones wait
            else:
                # The build waits for the actor's ordinary calls to finish (Ray's
                # compile calls the actor and blocks the event loop until it
                # answers); calls that come meanwhile wait for the graph.
                await build.wait()
                continue
            self._calls_out[key] = self._calls_out.get(key, 0) + 1
            try:
                result: CallResult = await self._inner.call(
                    actor, session_id, payloads, shared, tags
                )
            finally:
                self._calls_out[key] -= 1
                if not self._calls_out[key]:
                    del self._calls_out[key]
                    self._drained(key)
            return result
        ref = as_shared_ref(shared)
        # The lost errors include a channel error: an ordinary call after a teardown.
        sending = self._steps.call(actor, key, (session_id, payloads, ref, tags))
        return await self._inner.reply_of(sending, len(payloads), self._lost)

    def kill(self, actor: PoolActorHandle) -> None:
        self._inner.kill(actor)
        self._steps.forget(id(actor))
        self._no_build_until.pop(id(actor), None)
        self._born.pop(id(actor), None)
        self._drained(id(actor))  # a build waiting for calls to finish gives up
        build = self._builds.pop(id(actor), None)
        if build is not None:
            build.set()
        graph = self._graphs.pop(id(actor), None)
        if graph is not None:
            self._teardown(graph, "actor killed")

    async def end_session(self, actor: PoolActorHandle, session_id: str) -> None:
        graph = self._graphs.get(id(actor))
        if graph is None or not self.graph_ready(actor):
            await self._inner.end_session(actor, session_id)
            return
        # Shielded: a submission cut short would leave Ray's reply queue out of step.
        await asyncio.shield(self._execute(actor, graph, ("end", session_id)))

    async def retire(self, actor: PoolActorHandle) -> None:
        """An idle actor leaves the elastic pool: its graph goes first, then its
        sessions end through an ordinary call (the dispatcher kills it after)."""
        graph = self._graphs.pop(id(actor), None)
        if graph is not None:
            self._teardown(graph, "actor retired")
        await self._inner.retire(actor)

    async def status(self, actor: PoolActorHandle, timeout_s: float) -> ActorInfo:
        info = await self._inner.status(actor, timeout_s)
        info["data_path"] = "compiled" if self.graph_ready(actor) else "calls"
        return info

    async def close(self) -> None:
        """Tear down every graph and wait for it (the actors are killed by the pool)."""
        graphs = list(self._graphs.values())
        self._graphs.clear()
        for graph in graphs:
            self._teardown(graph, "pool closed")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30.0)

    # -- the graph path -------------------------------------------------------

    async def _send_one(self, actor: PoolActorHandle, part: RunArgs) -> RunReply:
        return (await self._send_many(actor, [part]))[0]

    async def _send_many(self, actor: PoolActorHandle, parts: list[RunArgs]) -> list[RunReply]:
        graph = self._graphs.get(id(actor))
        if graph is None or not graph.ready or graph.broken.is_set():
            # Torn down (idle, or a neighbour's failure) after the caller chose this path.
            return await self._inner._run_many(actor, parts)
        reply = await self._execute(actor, graph, ("run", parts))
        if not isinstance(reply, list) or len(reply) != len(parts):
            raise ActorLost(f"compiled graph answered {reply!r:.80} for {len(parts)} parts")
        return reply

    async def _execute(self, actor: PoolActorHandle, graph: _Graph, request: _Request) -> StepReply:
        graph.inflight += 1
        graph.last_used = time.monotonic()
        try:
            try:
                future = await graph.dag.execute_async(request)
            except self._ray.exceptions.RayCgraphCapacityExceeded:
                return await self._ordinary(actor, request)
            except Exception as exc:  # closed ("DAG execution cancelled") or broken
                self._broken(actor, graph, f"submit failed: {describe(exc)}")
                raise ActorLost(f"compiled graph failed: {describe(exc)}") from exc
            reply = asyncio.ensure_future(_await(future))
            broken = asyncio.ensure_future(graph.broken.wait())
            try:
                await asyncio.wait((reply, broken), return_when=asyncio.FIRST_COMPLETED)
            finally:
                broken.cancel()
            if not reply.done():
                reply.cancel()
                raise ActorLost("the actor's compiled graph broke (actor lost)")
            try:
                result: StepReply = reply.result()
            except self._ray.exceptions.RayTaskError:
                raise  # ``step`` itself failed: answered per sub-batch by the caller
            except Exception as exc:
                # A dead actor's first execution answers a channel error (or,
                # in Ray 2.60, a TypeError raised while reporting it).
                self._broken(actor, graph, describe(exc))
                raise ActorLost(f"compiled graph failed: {describe(exc)}") from exc
            return result
        finally:
            graph.inflight -= 1
            graph.last_used = time.monotonic()

    async def _ordinary(self, actor: PoolActorHandle, request: _Request) -> StepReply:
        _, arg = request
        if isinstance(arg, str):  # ("end", session_id)
            await self._inner.end_session(actor, arg)
            return True
        return await self._inner._run_many(actor, arg)

    def _broken(self, actor: PoolActorHandle, graph: _Graph, reason: str) -> None:
        if self._graphs.get(id(actor)) is graph:
            del self._graphs[id(actor)]
        self._teardown(graph, reason)

    # -- building and tearing down --------------------------------------------

    def _maybe_build(self, actor: PoolActorHandle) -> asyncio.Event | None:
        key = id(actor)
        if key in self._graphs or key not in self.handles:
            return None
        now = time.monotonic()
        if now < self._no_build_until.get(key, 0.0) or now < self._born.get(key, 0.0) + _STABLE_S:
            return None
        done = self._builds[key] = asyncio.Event()
        self._spawn(self._build(actor, done))
        return done

    def _drained(self, key: int) -> None:
        event = self._drain.pop(key, None)
        if event is not None:
            event.set()

    async def _build(self, actor: PoolActorHandle, done: asyncio.Event) -> None:
        key = id(actor)
        try:
            while self._calls_out.get(key, 0) > 0 and key in self.handles:
                drained = self._drain.setdefault(key, asyncio.Event())
                await drained.wait()
            if key not in self.handles:
                return  # killed meanwhile
            # A call we gave up on (timeout) may still run there: the probe queues
            # behind it, so the compile below finds the actor free.
            await actor.__ray_call__.remote(_probe)
            if key not in self.handles:
                return
            from ray.dag import InputNode

            with InputNode() as request:
                node = actor.step.bind(request)
            started = time.perf_counter()
            # Blocks the event loop (~0.1 s): Ray's asyncio graph must be made on it.
            dag = node.experimental_compile(
                enable_asyncio=True, _max_inflight_executions=_MAX_INFLIGHT
            )
            graph = _Graph(dag=dag, ready=True)
            if key not in self.handles:  # killed while compiling
                self._teardown(graph, "actor killed while compiling")
                return
            self._graphs[key] = graph
            self.builds += 1
            log.debug("compiled graph up in %.3f s", time.perf_counter() - started)
            self._spawn(self._watch(actor, graph))
            self._arm_idle(actor, graph)
        except self._lost as exc:
            log.debug("actor lost while its compiled graph was built: %s", describe(exc))
        except Exception as exc:
            log.warning("compiled graph could not be built; ordinary calls: %s", describe(exc))
            self._no_build_until[key] = time.monotonic() + _BUILD_RETRY_S
        finally:
            if self._builds.get(key) is done:
                del self._builds[key]
            done.set()

    async def _watch(self, actor: PoolActorHandle, graph: _Graph) -> None:
        """Break the graph when the actor's graph loop ends (the actor died)."""
        refs = list(graph.dag.worker_task_refs.values())
        loop_done = asyncio.ensure_future(asyncio.gather(*refs))
        loop_done.add_done_callback(_retrieve)
        broken = asyncio.ensure_future(graph.broken.wait())
        try:
            await asyncio.wait((loop_done, broken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            broken.cancel()
        if not loop_done.done():
            loop_done.cancel()
            return
        reason = "graph loop ended"
        if loop_done.exception() is not None:
            reason = describe(loop_done.exception())  # type: ignore[arg-type]
        self._broken(actor, graph, reason)

    def _arm_idle(self, actor: PoolActorHandle, graph: _Graph) -> None:
        due = graph.last_used + self._idle_s
        delay = max(0.05, due - time.monotonic())
        loop = asyncio.get_running_loop()
        graph.idle_timer = loop.call_later(delay, self._check_idle, actor, graph)

    def _check_idle(self, actor: PoolActorHandle, graph: _Graph) -> None:
        if graph.broken.is_set() or self._graphs.get(id(actor)) is not graph:
            return
        if graph.inflight == 0 and time.monotonic() - graph.last_used >= self._idle_s:
            # Wait for the actor's loop to stop before a new graph may be built.
            self._no_build_until[id(actor)] = float("inf")
            self._broken(actor, graph, "idle")
            assert graph.closed is not None
            graph.closed.add_done_callback(lambda _: self._no_build_until.pop(id(actor), None))
            return
        self._arm_idle(actor, graph)

    def _teardown(self, graph: _Graph, reason: str) -> None:
        if graph.closed is not None:
            return
        graph.ready = False
        graph.broken.set()
        if graph.idle_timer is not None:
            graph.idle_timer.cancel()
        self.teardowns += 1
        log.debug("tearing down a compiled graph: %s", reason)
        graph.closed = asyncio.get_running_loop().create_future()
        self._spawn(self._teardown_now(graph))

    async def _teardown_now(self, graph: _Graph) -> None:
        assert graph.closed is not None
        try:
            await asyncio.to_thread(graph.dag.teardown)
        except Exception as exc:
            log.debug("compiled graph teardown: %s", describe(exc))
        finally:
            if not graph.closed.done():
                graph.closed.set_result(None)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _retrieve(future: asyncio.Future[T]) -> None:
    if not future.cancelled():
        future.exception()  # seen: no "exception never retrieved" warning


def _probe(actor: object) -> None:
    """Runs on the actor after the calls queued there (``__ray_call__``)."""


async def _await(future: Awaitable[StepReply]) -> StepReply:
    return await future
