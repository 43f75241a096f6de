"""Least-loaded dispatch of task batches over a set of actors, with retries and timeouts.

Pure asyncio and no Ray: actors are reached through a
:class:`~ray_alpcrun.pool.interfaces.Calls` backend, so this logic is tested
against a fake one (``tests/support/fake_backend.py``) and runs on Ray through
:mod:`ray_alpcrun.pool.backend`. Which actors exist (start, replacement, the
elastic grow and release, whether the pool serves at all) is the business of
:mod:`ray_alpcrun.pool.membership`, seen here only as a
:class:`~ray_alpcrun.pool.interfaces.Roster`; this module decides which of its
members runs what, and what happens when a call dies or hangs.

Guarantees, per task of a :meth:`Dispatcher.run` call: exactly one outcome — the
handler's result, the handler's error, ``"actor died N times"`` once retries are
spent, or ``"task timed out after X s"`` (also for a batch that waited that
long for a live actor before it could start, while actor starts failed). While
no actor is live, batches wait for one; none is ever answered with an error
because the pool is empty. Two exceptions escape:
:class:`SessionSetupError` (the batch cannot run at all) and
:class:`PoolUnavailable` (the pool gave up for now); the caller answers the
batch dead.

Waiting is first come, first served, and a wake-up is O(1): batches waiting for
room on an actor keep their place in a :class:`~ray_alpcrun.pool.waiting.Line`,
and a completed call wakes the first of them only, which passes the turn on
once it is admitted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ray_alpcrun.errors import ActorLost, AlpcrunError, PoolUnavailable
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.chunks import plan_chunks
from ray_alpcrun.pool.interfaces import (
    CLOSED,
    UNAVAILABLE,
    Availability,
    Backend,
    CallResult,
    Calls,
    Member,
    Roster,
)
from ray_alpcrun.pool.session_end import END_WAIT_MIN_S, end_everywhere
from ray_alpcrun.pool.waiting import Claims, Crowd, Line
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


class _WaitedTooLong(Exception):
    """No actor was live during the whole task timeout."""


@dataclass(eq=False, slots=True)
class _Reserved(Generic[A]):
    """Load put on ``member`` for a sub-batch before it is sent: the call takes it
    over (``count`` drops to 0); what is still reserved when the batch ends (it
    was cancelled before its sub-batches started) is given back."""

    member: Member[A]
    count: int


class Dispatcher(Generic[A]):
    """Runs batches on the members of a :class:`Roster`: least loaded first, with
    retries for actors that die and timeouts for actors that hang. A batch that
    finds no live actor waits for one.

    >>> membership = Membership(backend, num_actors=2)
    >>> d = Dispatcher(membership, backend, task_timeout_s=30.0)
    >>> await membership.start()
    >>> outcomes = await d.run("session-1", [b"a", b"b"], shared=None)
    """

    def __init__(
        self,
        roster: Roster[A],
        backend: Calls[A],
        *,
        min_chunk: int = 16,
        min_chunk_work_s: float = 0.0,
        max_call_retries: int = 2,
        task_timeout_s: float | None = None,
        timeout_slack_s: float = 1.0,
        end_wait_min_s: float = END_WAIT_MIN_S,
    ) -> None:
        self._roster = roster
        self._backend = backend
        self._min_chunk = max(1, min_chunk)
        self._min_work_s = min_chunk_work_s
        self._max_retries = max_call_retries
        self._timeout_s = task_timeout_s
        self._slack_s = timeout_slack_s
        self._end_wait_min_s = end_wait_min_s
        self._line = Line()  # batches waiting in _admit, in arrival order
        # Sub-batches waiting for any live actor (retries): woken by roster changes.
        self._retrying = Crowd()
        self._isolating: Claims[Member[A]] = Claims()  # actors an isolated task runs on
        self._outage = False  # no live actor, and starts fail
        roster.watch(self._on_roster)
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
        """Run a batch: one outcome per payload, in order.

        Raises :class:`SessionSetupError` when the batch cannot run and
        :class:`PoolUnavailable` when the pool gave up for now.
        """
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
        except _WaitedTooLong:
            return [(None, self._timeout_text())] * n
        except PoolUnavailable:
            raise
        except AlpcrunError as exc:
            return [(None, str(exc))] * n
        plan = plan_chunks([m.inflight for m in live], n, self.chunk_floor())
        batch = payloads if isinstance(payloads, list) else list(payloads)
        jobs = []
        reserved: list[_Reserved[A]] = []
        start = 0
        for index, count in plan:
            member = live[index]
            # Reserve now, before any await, so concurrent batches see this load.
            member.inflight += count
            reserved.append(_Reserved(member, count))
            part = _Part(session_id, batch[start : start + count], shared, tags, start)
            jobs.append(self._run_part(member, part, out, reserved=reserved[-1]))
            start += count
        try:
            if len(jobs) == 1:
                await jobs[0]
            else:
                done = await asyncio.gather(*jobs, return_exceptions=True)
                for result in done:
                    if isinstance(result, BaseException):
                        raise result
        finally:
            # Cancelled before a sub-batch started: its load was never taken over.
            for r in reserved:
                if r.count:
                    self._unload(r.member, r.count)
                    r.count = 0
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
        """Tell every live actor that the session ended (see :func:`end_everywhere`)."""
        await end_everywhere(self._roster, self._backend, session_id, self.end_wait_s)

    def end_wait_s(self, member: Member[A]) -> float | None:
        """How long a session end may take on ``member`` (None: no task timeout)."""
        if self._timeout_s is None:
            return None
        return self._end_wait_min_s + self._timeout_s * member.inflight + self._slack_s

    # -- internals --------------------------------------------------------

    async def _run_part(
        self,
        member: Member[A] | None,
        part: _Part,
        out: list[Outcome | None],
        *,
        deaths: int = 0,
        reserved: _Reserved[A] | None = None,
        claims: Claims[Member[A]] | None = None,
    ) -> None:
        """Run ``part`` until it has outcomes. ``claims``: actors that other tasks
        of the same isolation run use now; this one waits for another actor."""
        n = len(part.payloads)
        behind = 0  # timeouts of a one-task call while other calls were in flight there
        while True:
            if member is None:
                try:
                    member = await self._least_loaded(claims)
                except PoolUnavailable:
                    raise
                except AlpcrunError as exc:
                    self._fill(out, part, str(exc))
                    return
            current = member
            if claims is not None:
                claims.held.add(current)
            try:
                result = await self._call(current, part, reserved)
            except ActorLost as exc:
                if not member.killed:
                    deaths += 1
                self._roster.lost(member, str(exc))
                # Deaths count against a task only while it runs alone: a sub-batch
                # that keeps dying is split into single-task calls first, so a
                # neighbour of a crashing task is never failed for its crashes.
                if n > 1 and (deaths >= _ISOLATE_AFTER_DEATHS or deaths > self._max_retries):
                    await self._isolate(part, out)
                    return
                if deaths > self._max_retries:
                    self._fill(out, part, f"actor died {deaths} times: {exc}")
                    return
                member, reserved = None, None
                continue
            except _TimedOut:
                log.warning(
                    "sub-batch timed out; replacing its actor",
                    extra=fields(session=part.session_id, actor=member.index, tasks=n),
                )
                self._roster.lost(member, "timed out", killed=True)
                if n == 1 and member.inflight > 0 and behind < self._max_retries:
                    behind, member = behind + 1, None  # it may have waited behind a hang
                    continue
                if n == 1:
                    out[part.offset] = (None, self._timeout_text())
                else:
                    await self._isolate(part, out)
                return
            finally:
                if claims is not None:
                    claims.release(current)
            if len(result) != n:
                self._fill(out, part, f"actor answered {len(result)} outcomes for {n} tasks")
            else:
                out[part.offset : part.offset + n] = result
            return

    async def _isolate(self, part: _Part, out: list[Outcome | None]) -> None:
        """Re-run a sub-batch one task per call, so a hung or crashing task fails alone.

        At most one of these calls runs on an actor at a time, whichever
        sub-batch it isolates: when the culprit takes its actor down, or hangs,
        no other isolated task goes with it (queued calls travel together in
        one frame, whose replies come back together; Ray may lose the reply of
        the call before a crash, too).
        """
        todo = deque(range(len(part.payloads)))
        claims = self._isolating

        async def lane() -> None:
            while todo:
                i = todo.popleft()
                single = _Part(
                    part.session_id, [part.payloads[i]], part.shared, part.tags, part.offset + i
                )
                await self._run_part(None, single, out, claims=claims)

        size = len(self._roster.members()) + self._roster.pending
        lanes = [lane() for _ in range(min(len(todo), max(1, size)))]
        done = await asyncio.gather(*lanes, return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result

    async def _call(
        self, member: Member[A], part: _Part, reserved: _Reserved[A] | None
    ) -> list[Outcome]:
        n = len(part.payloads)
        if reserved is not None and reserved.member is member and reserved.count == n:
            reserved.count = 0  # this call owns the reserved load now
        else:
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
            self._unload(member, n)
        if spent_s is not None and n:
            sample = spent_s / n
            cost = self.task_cost_s
            self.task_cost_s = sample if cost is None else cost + _COST_SMOOTHING * (sample - cost)
        return outcomes

    def _unload(self, member: Member[A], n: int) -> None:
        member.inflight -= n
        if member.inflight == 0:
            member.idle_since = asyncio.get_running_loop().time()
        if self._line:
            self._line.wake()  # the first batch in line may fit now

    async def _admit(self) -> list[Member[A]]:
        """The actors a new batch may go to; waits while there are none.

        While actors are pending (the pool grows, or one is being replaced), a
        live actor takes at most two sub-batches' worth of queued tasks: the
        rest of a burst waits here for the next free or new actor, instead of
        piling onto the first actor that came up. With no live actor at all, a
        batch waits for one (while actor starts fail, at most the task timeout).
        """
        deadline: float | None = None
        place = None
        try:
            while True:
                live = self._roster.members()
                timeout_s: float | None = None
                if not live:
                    timeout_s, deadline = self._no_actor_wait(deadline)
                # Room found goes to the batches ahead in line first.
                elif place is None or self._line.first(place):
                    if not self._roster.pending:
                        return live
                    cap = 2 * self.chunk_floor()
                    free = [m for m in live if m.inflight < cap]
                    if free:
                        return free
                if place is None:
                    place = self._line.join()
                await self._line.wait(place, timeout_s)
        finally:
            if place is not None:
                self._line.leave(place)  # a turn it got goes on to the next batch

    async def _least_loaded(self, claims: Claims[Member[A]] | None = None) -> Member[A]:
        """The live actor with the fewest tasks in flight, not claimed; waits while
        none is live (or all are claimed)."""
        while True:
            live = self._roster.members()
            free = [m for m in live if m not in claims.held] if claims else live
            if free:
                return min(free, key=_inflight)
            if not live:
                # No task timeout here: a retry waits for the replacement of the
                # actor a neighbour crashed (bounded by the pool's grace), so that
                # it does not fail for that crash.
                self._raise_if_down()
            crowds = [self._retrying] if claims is None else [self._retrying, claims.waiters]
            await Crowd.wait_any(crowds)

    def _raise_if_down(self) -> Availability:
        """No live actor: raise why not to wait for one (closed, or given up for now)."""
        availability = self._roster.availability()
        if availability.state == CLOSED:
            raise AlpcrunError("the actor pool is closed")
        if availability.state == UNAVAILABLE:
            raise PoolUnavailable(availability.reason)
        return availability

    def _no_actor_wait(self, deadline: float | None) -> tuple[float | None, float | None]:
        """No live actor for a batch to start on: raise why not to wait (see
        :meth:`_raise_if_down`, or the task timeout waited out), else how long to
        wait at most, and the deadline.

        The task timeout counts while actor starts fail (an outage), not while a
        replacement or a new actor is still starting (a second or two, or the
        minutes an autoscaler takes): that is no reason to fail a task."""
        if self._raise_if_down().start_error is None or self._timeout_s is None:
            return None, None
        now = asyncio.get_running_loop().time()
        if deadline is None:
            deadline = now + self._timeout_s
        if now >= deadline:
            raise _WaitedTooLong
        return deadline - now, deadline

    def _on_roster(self, availability: Availability) -> None:
        outage = availability.live == 0 and availability.start_error is not None
        if availability.state in (CLOSED, UNAVAILABLE) or (outage and not self._outage):
            # Every waiting batch learns why it cannot run, or starts its task timeout.
            self._line.wake_all()
        elif self._line:
            self._line.wake()
        self._outage = outage
        self._retrying.wake_all()

    def _timeout_text(self) -> str:
        return f"task timed out after {self._timeout_s:g} s"

    @staticmethod
    def _fill(out: list[Outcome | None], part: _Part, error: str) -> None:
        for i in range(part.offset, part.offset + len(part.payloads)):
            out[i] = (None, error)


def _inflight(member: Member[A]) -> int:
    return member.inflight
