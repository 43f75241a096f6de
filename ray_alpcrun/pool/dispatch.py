"""Least-loaded dispatch of task batches over a set of actors, with retries and timeouts.

Pure asyncio and no Ray: actors are reached through a :class:`Backend`, so this
logic is tested against a fake one (``tests/unit/test_dispatch.py``) and runs on Ray
through :mod:`ray_alpcrun.pool.actor_pool`.

Guarantees, per task of a :meth:`Dispatcher.run` call: exactly one outcome — the
handler's result, the handler's error, ``"actor died N times"`` once retries are
spent, or ``"task timed out after X s"``. Only :class:`SessionSetupError` (the
batch cannot run at all) escapes as an exception.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ray_alpcrun.errors import ActorLost, AlpcrunError
from ray_alpcrun.logs import fields
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)

A = TypeVar("A")

# A task that kills its actor this many times in one sub-batch is isolated: its
# sub-batch is re-run one task per call, so only the culprit spends its retries.
_ISOLATE_AFTER_DEATHS = 2
# Weight of the newest sample in the running estimate of a task's cost.
_COST_SMOOTHING = 0.2

# What an actor answers for a sub-batch: outcomes in order, and the seconds the
# handler spent on them (None if unknown).
CallResult = tuple[list[Outcome], float | None]


class Backend(Protocol[A]):
    """How the dispatcher reaches actors of type ``A``."""

    async def start_actor(self) -> A:
        """Create one actor and return once it is ready to take calls."""

    async def call(
        self,
        actor: A,
        session_id: str,
        payloads: list[bytes],
        shared: Any,
        tags: tuple[str, ...],
    ) -> CallResult:
        """Run a sub-batch; one outcome per payload, in order, and the handler's time.

        Raises :class:`ActorLost` if the actor is gone and
        :class:`~ray_alpcrun.errors.SessionSetupError` if nothing could run.
        """

    def kill(self, actor: A) -> None:
        """Stop the actor now (it may already be dead)."""

    async def end_session(self, actor: A, session_id: str) -> None:
        """Release the session's state on that actor."""

    async def retire(self, actor: A) -> None:
        """Retire an idle actor: run every session's end hook there, then stop it."""


@dataclass(eq=False, slots=True)
class Member(Generic[A]):
    """One incarnation of an actor at one index of the pool."""

    actor: A
    index: int
    inflight: int = 0  # tasks submitted and not answered
    alive: bool = True
    idle_since: float = 0.0  # loop time when ``inflight`` last dropped to zero
    # Killed by us (timeout, close): deaths of its other calls are not their tasks' fault.
    killed: bool = False


@dataclass(frozen=True, slots=True)
class _Part:
    session_id: str
    payloads: list[bytes]
    shared: Any
    tags: tuple[str, ...]
    offset: int  # index of payloads[0] in the whole batch


class _TimedOut(Exception):
    pass


def plan_chunks(loads: Sequence[int], n: int, min_chunk: int) -> list[tuple[int, int]]:
    """Split ``n`` tasks over actors with in-flight ``loads``: ``[(actor index, count)]``.

    At most ``n // min_chunk`` chunks (at least one): for cheap tasks a Ray call
    costs more than the tasks, so small batches stay whole. Within that, the
    least-loaded actors are filled so their loads even out (water-filling), and
    a chunk below ``min_chunk`` is folded into the others.
    """
    if n <= 0 or not loads:
        return []
    k = max(1, min(len(loads), n // min_chunk))
    order = sorted(range(len(loads)), key=loads.__getitem__)[:k]
    while True:
        base = [loads[i] for i in order]
        m = len(order)
        # Water level: largest m whose most loaded member still sits below it.
        while m > 1 and (n + sum(base[:m])) <= base[m - 1] * m:
            m -= 1
        level, rest = divmod(n + sum(base[:m]), m)
        counts = [level - base[i] for i in range(m)]
        for i in range(rest):
            counts[i] += 1
        plan = [(order[i], c) for i, c in enumerate(counts) if c > 0]
        if len(plan) == 1 or min(c for _, c in plan) >= min_chunk:
            return plan
        order = [i for i, _ in plan][:-1]


class Dispatcher(Generic[A]):
    """Runs batches on a row of actors; replaces actors that die or hang.

    The row holds ``num_actors`` unless the owner adds and retires
    actors with :meth:`grow` and :meth:`release` (the elastic pool). With
    ``elastic``, a batch that finds no live actor waits for one instead of failing.

    >>> d = Dispatcher(backend, num_actors=2, task_timeout_s=30.0)
    >>> await d.start()
    >>> outcomes = await d.run("session-1", [b"a", b"b"], shared=None)
    """

    def __init__(
        self,
        backend: Backend[A],
        *,
        num_actors: int,
        min_chunk: int = 16,
        min_chunk_work_s: float = 0.0,
        max_call_retries: int = 2,
        task_timeout_s: float | None = None,
        timeout_slack_s: float = 1.0,
        restart_attempts: int = 3,
        restart_backoff_s: float = 0.5,
        elastic: bool = False,
    ) -> None:
        if num_actors < (0 if elastic else 1):
            raise ValueError("num_actors must be at least 1")
        self._backend = backend
        self._num_actors = num_actors
        self._min_chunk = max(1, min_chunk)
        self._min_work_s = min_chunk_work_s
        self._max_retries = max_call_retries
        self._timeout_s = task_timeout_s
        self._slack_s = timeout_slack_s
        self._restart_attempts = restart_attempts
        self._restart_backoff_s = restart_backoff_s
        self._members: list[Member[A] | None] = []
        self._restarting: set[int] = set()
        self._starting: dict[int, asyncio.Task[None]] = {}
        self._elastic = elastic
        self._admitting = 0  # batches waiting in _admit
        self.batches = 0
        """Batches in :meth:`run` now: on an actor or waiting for one (the load)."""
        self.released = 0
        """Idle actors retired by :meth:`release`."""
        self.start_error: str | None = None
        """Why the last actor start failed, if it did (cleared by a success)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closed = False
        self.restarts = 0
        """Actors replaced since start (died, unreachable or hung)."""
        self.task_cost_s: float | None = None
        """Running estimate of the handler's seconds per task (from the actors' timings)."""

    @property
    def size(self) -> int:
        """Actors kept: live or being started (the configured number for a fixed pool)."""
        if not self._elastic:
            return self._num_actors
        return len(self.members()) + len(self._restarting)

    @property
    def pending(self) -> int:
        """Actors asked for and not ready yet (started, restarted or waiting for room)."""
        return len(self._restarting)

    def members(self) -> list[Member[A]]:
        """The live actors now."""
        return [m for m in self._members if m is not None and m.alive]

    async def start(self) -> None:
        """Start every actor; on any failure stop the others and re-raise it."""
        started = await asyncio.gather(
            *(self._backend.start_actor() for _ in range(self._num_actors)),
            return_exceptions=True,
        )
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            for r in started:
                if not isinstance(r, BaseException):
                    self._backend.kill(r)
            raise failures[0]
        now = asyncio.get_running_loop().time()
        self._members = [
            Member(actor, i, idle_since=now)  # type: ignore[arg-type]
            for i, actor in enumerate(started)
        ]

    async def run(
        self,
        session_id: str,
        payloads: Sequence[bytes],
        shared: Any = None,
        tags: tuple[str, ...] = (),
    ) -> list[Outcome]:
        """Run a batch: one outcome per payload, in order."""
        n = len(payloads)
        if n == 0:
            return []
        self.batches += 1
        try:
            return await self._run_batch(session_id, payloads, shared, tags)
        finally:
            self.batches -= 1

    async def _run_batch(
        self, session_id: str, payloads: Sequence[bytes], shared: Any, tags: tuple[str, ...]
    ) -> list[Outcome]:
        n = len(payloads)
        out: list[Outcome | None] = [None] * n
        try:
            live = await self._admit()
        except AlpcrunError as exc:
            return [(None, str(exc))] * n
        plan = plan_chunks([m.inflight for m in live], n, self.chunk_floor())
        batch = payloads if isinstance(payloads, list) else list(payloads)
        jobs = []
        start = 0
        for index, count in plan:
            member = live[index]
            # Reserve now, before any await, so concurrent batches see this load.
            member.inflight += count
            part = _Part(session_id, batch[start : start + count], shared, tags, start)
            jobs.append(self._run_part(member, part, out, reserved=True))
            start += count
        if len(jobs) == 1:
            await jobs[0]
        else:
            done = await asyncio.gather(*jobs, return_exceptions=True)
            for result in done:
                if isinstance(result, BaseException):
                    raise result
        if None in out:  # pragma: no cover - would be a bug in this module
            raise AlpcrunError("dispatch lost a task outcome")
        return out  # type: ignore[return-value]

    def chunk_floor(self) -> int:
        """Fewest tasks worth a Ray call: ``min_chunk``, and enough measured work."""
        cost = self.task_cost_s
        if cost is None or self._min_work_s <= 0:
            return self._min_chunk
        if cost <= 0:
            return 1 << 30
        return max(self._min_chunk, math.ceil(self._min_work_s / cost))

    async def end_session(self, session_id: str) -> None:
        """Tell every live actor that the session ended (dead ones forget anyway)."""
        members = self.members()
        done = await asyncio.gather(
            *(self._backend.end_session(m.actor, session_id) for m in members),
            return_exceptions=True,
        )
        for m, result in zip(members, done, strict=True):
            if isinstance(result, ActorLost):
                self._replace(m, f"lost during session end: {result}")
            elif isinstance(result, Exception):
                log.warning(
                    "session end failed on an actor",
                    extra=fields(session=session_id, actor=m.index, error=str(result)),
                )

    def grow(self, count: int) -> None:
        """Ask for ``count`` more actors; they join as they become ready (pending till then)."""
        for _ in range(count):
            if self._closed:
                return
            free = [
                i
                for i, m in enumerate(self._members)
                if (m is None or not m.alive) and i not in self._restarting
            ]
            index = free[0] if free else len(self._members)
            if index == len(self._members):
                self._members.append(None)
            self._spawn(index)

    def release(self, count: int) -> int:
        """Retire up to ``count`` actors: pending ones first, then the longest idle.

        A live actor goes only with nothing in flight; it is out of the pool at
        once (no new work reaches it), then its sessions' end hooks run and it
        stops. Returns how many went.
        """
        done = 0
        for index in sorted(self._restarting, reverse=True):
            if done >= count:
                return done
            task = self._starting.get(index)
            if task is not None and not task.done():
                task.cancel()  # the backend kills an actor that was still starting
                self._restarting.discard(index)
                done += 1
        idle = sorted((m for m in self.members() if m.inflight == 0), key=_idle_since)
        for m in idle[: count - done]:
            m.alive = False
            m.killed = True
            self._members[m.index] = None
            self.released += 1
            done += 1
            task = asyncio.create_task(self._retire(m))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if done:
            self._notify()
        return done

    async def _retire(self, member: Member[A]) -> None:
        try:
            await self._backend.retire(member.actor)
        except Exception as exc:
            log.warning(
                "releasing an actor failed", extra=fields(actor=member.index, error=str(exc))
            )
        finally:
            self._backend.kill(member.actor)

    async def settle(self) -> None:
        """Wait until no actor replacement is pending (back to full size, or given up)."""
        while self._restarting and not self._closed:
            wake = self._wake
            await wake.wait()

    async def close(self) -> None:
        """Stop restarts and kill every actor. Batches still running get errors."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for m in self.members():
            m.alive = False
            m.killed = True
            self._backend.kill(m.actor)
        self._notify()

    # -- internals --------------------------------------------------------

    async def _run_part(
        self,
        member: Member[A] | None,
        part: _Part,
        out: list[Outcome | None],
        *,
        deaths: int = 0,
        reserved: bool = False,
        claimed: set[Member[A]] | None = None,
    ) -> None:
        """Run ``part`` until it has outcomes. ``claimed``: actors that other tasks
        of the same isolation run use now; this one waits for another actor."""
        n = len(part.payloads)
        while True:
            if member is None:
                try:
                    member = await self._least_loaded(claimed)
                except AlpcrunError as exc:
                    self._fill(out, part, str(exc))
                    return
            if claimed is not None:
                claimed.add(member)
            try:
                result = await self._call(member, part, reserved)
            except ActorLost as exc:
                if not member.killed:
                    deaths += 1
                self._replace(member, str(exc))
                # Deaths count against a task only while it runs alone: a sub-batch
                # that keeps dying is split into single-task calls first, so a
                # neighbour of a crashing task is never failed for its crashes.
                if n > 1 and (deaths >= _ISOLATE_AFTER_DEATHS or deaths > self._max_retries):
                    await self._isolate(part, out)
                    return
                if deaths > self._max_retries:
                    self._fill(out, part, f"actor died {deaths} times: {exc}")
                    return
                member, reserved = None, False
                continue
            except _TimedOut:
                log.warning(
                    "sub-batch timed out; replacing its actor",
                    extra=fields(session=part.session_id, actor=member.index, tasks=n),
                )
                member.killed = True
                self._replace(member, "timed out")
                if n == 1:
                    out[part.offset] = (None, f"task timed out after {self._timeout_s:g} s")
                else:
                    await self._isolate(part, out)
                return
            finally:
                if claimed is not None:
                    claimed.discard(member)
                    self._notify()
            if len(result) != n:
                self._fill(out, part, f"actor answered {len(result)} outcomes for {n} tasks")
            else:
                out[part.offset : part.offset + n] = result
            return

    async def _isolate(self, part: _Part, out: list[Outcome | None]) -> None:
        """Re-run a sub-batch one task per call, so a hung or crashing task fails alone.

        At most one of these calls runs on an actor at a time: when the culprit
        takes its actor down, no other task of the sub-batch goes with it (Ray
        may lose the reply of the call before a crash, too).
        """
        todo = deque(range(len(part.payloads)))
        claimed: set[Member[A]] = set()

        async def lane() -> None:
            while todo:
                i = todo.popleft()
                single = _Part(
                    part.session_id, [part.payloads[i]], part.shared, part.tags, part.offset + i
                )
                await self._run_part(None, single, out, claimed=claimed)

        lanes = [lane() for _ in range(min(len(todo), max(1, self.size)))]
        done = await asyncio.gather(*lanes, return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result

    async def _call(self, member: Member[A], part: _Part, reserved: bool) -> list[Outcome]:
        n = len(part.payloads)
        if not reserved:
            member.inflight += n
        try:
            call = self._backend.call(
                member.actor, part.session_id, part.payloads, part.shared, part.tags
            )
            if self._timeout_s is None:
                outcomes, spent_s = await call
            else:
                # The actor runs calls one after another: this one may wait behind
                # everything already queued there, each of which has its own budget.
                deadline_s = self._timeout_s * max(1, member.inflight) + self._slack_s
                try:
                    outcomes, spent_s = await asyncio.wait_for(call, deadline_s)
                except asyncio.TimeoutError as exc:
                    raise _TimedOut from exc
        finally:
            member.inflight -= n
            if member.inflight == 0:
                member.idle_since = asyncio.get_running_loop().time()
            if self._admitting:
                self._notify()  # a batch waits for room on an actor
        if spent_s is not None and n:
            sample = spent_s / n
            cost = self.task_cost_s
            self.task_cost_s = sample if cost is None else cost + _COST_SMOOTHING * (sample - cost)
        return outcomes

    async def _admit(self) -> list[Member[A]]:
        """The actors a new batch may go to; waits while there are none.

        While actors are pending (the pool grows, or one is being replaced), a
        live actor takes at most two sub-batches' worth of queued tasks: the
        rest of a burst waits here for the next free or new actor, instead of
        piling onto the first actor that came up.
        """
        self._admitting += 1
        try:
            while True:
                live = self.members()
                if live and not self._restarting:
                    return live
                cap = 2 * self.chunk_floor()
                free = [m for m in live if m.inflight < cap]
                if free:
                    return free
                gone = not self._restarting and (not self._elastic or self.start_error)
                if not live and (self._closed or gone):
                    return [await self._least_loaded()]  # raises why there is none
                wake = self._wake
                await wake.wait()
        finally:
            self._admitting -= 1

    async def _least_loaded(self, claimed: set[Member[A]] | None = None) -> Member[A]:
        """The live actor with the fewest tasks in flight, not in ``claimed``; waits
        while all restart (or are claimed)."""
        while True:
            if self._closed:
                raise AlpcrunError("the actor pool is closed")
            live = self.members()
            free = [m for m in live if m not in claimed] if claimed else live
            if free:
                return min(free, key=_inflight)
            if not live and not self._restarting:
                if not self._elastic:
                    raise AlpcrunError("no live actors left in the pool")
                if self.start_error is not None:
                    raise AlpcrunError(f"no pool actor could start: {self.start_error}")
            wake = self._wake
            await wake.wait()

    def _replace(self, member: Member[A], reason: str) -> None:
        if not member.alive:
            return  # already being replaced
        member.alive = False
        self.restarts += 1
        log.warning(
            "replacing actor",
            extra=fields(actor=member.index, reason=reason, restarts=self.restarts),
        )
        # It may only be unreachable, or hung: make sure it is gone.
        self._backend.kill(member.actor)
        if self._closed:
            return
        self._spawn(member.index)

    def _spawn(self, index: int) -> None:
        self._restarting.add(index)
        task = asyncio.create_task(self._restart(index))
        self._starting[index] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, index: int) -> None:
        try:
            for attempt in range(self._restart_attempts):
                try:
                    actor = await self._backend.start_actor()
                except Exception as exc:
                    self.start_error = str(exc)
                    log.warning(
                        "actor restart failed",
                        extra=fields(actor=index, attempt=attempt + 1, error=str(exc)),
                    )
                    await asyncio.sleep(self._restart_backoff_s * 2**attempt)  # ok: backoff
                    continue
                if self._closed:
                    self._backend.kill(actor)
                    return
                self.start_error = None
                now = asyncio.get_running_loop().time()
                self._members[index] = Member(actor, index, idle_since=now)
                return
            log.error("actor abandoned after failed restarts", extra=fields(actor=index))
        finally:
            if self._starting.get(index) is asyncio.current_task():
                del self._starting[index]
            self._restarting.discard(index)
            self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    @staticmethod
    def _fill(out: list[Outcome | None], part: _Part, error: str) -> None:
        for i in range(part.offset, part.offset + len(part.payloads)):
            out[i] = (None, error)


def _inflight(member: Member[Any]) -> int:
    return member.inflight


def _idle_since(member: Member[Any]) -> float:
    return member.idle_since
