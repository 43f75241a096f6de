"""Least-loaded dispatch of task batches over a set of actors, with retries and timeouts.

Pure asyncio and no Ray: actors are reached through a
:class:`~ray_alpcrun.pool.membership.Backend`, so this logic is tested against a
fake one (``tests/support/fake_backend.py``) and runs on Ray through
:mod:`ray_alpcrun.pool.backend`. Which actors exist (start, replacement, the
elastic grow and release) is :mod:`ray_alpcrun.pool.membership`'s business;
this module decides which of them runs what, and what happens when a call dies
or hangs.

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
from typing import TypeVar

from ray_alpcrun.errors import ActorLost, AlpcrunError
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.membership import Backend, CallResult, Member, Membership
from ray_alpcrun.runtime import Outcome

__all__ = ["Backend", "CallResult", "Dispatcher", "Member", "plan_chunks"]

log = logging.getLogger(__name__)

A = TypeVar("A")

# A task that kills its actor this many times in one sub-batch is isolated: its
# sub-batch is re-run one task per call, so only the culprit spends its retries.
_ISOLATE_AFTER_DEATHS = 2
# Weight of the newest sample in the running estimate of a task's cost.
_COST_SMOOTHING = 0.2


@dataclass(frozen=True, slots=True)
class _Part:
    session_id: str
    payloads: list[bytes]
    shared: object
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


class Dispatcher(Membership[A]):
    """Runs batches on the row of actors (:class:`Membership`): least loaded first,
    with retries for actors that die and timeouts for actors that hang. With
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
        super().__init__(
            backend,
            num_actors=num_actors,
            restart_attempts=restart_attempts,
            restart_backoff_s=restart_backoff_s,
            elastic=elastic,
        )
        self._min_chunk = max(1, min_chunk)
        self._min_work_s = min_chunk_work_s
        self._max_retries = max_call_retries
        self._timeout_s = task_timeout_s
        self._slack_s = timeout_slack_s
        self._admitting = 0  # batches waiting in _admit
        self.batches = 0
        """Batches in :meth:`run` now: on an actor or waiting for one (the load)."""
        self.task_cost_s: float | None = None
        """Running estimate of the handler's seconds per task (from the actors' timings)."""

    async def run(
        self,
        session_id: str,
        payloads: Sequence[bytes],
        shared: object = None,
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
        self, session_id: str, payloads: Sequence[bytes], shared: object, tags: tuple[str, ...]
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

    @staticmethod
    def _fill(out: list[Outcome | None], part: _Part, error: str) -> None:
        for i in range(part.offset, part.offset + len(part.payloads)):
            out[i] = (None, error)


def _inflight(member: Member[A]) -> int:
    return member.inflight
