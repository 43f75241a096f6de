"""Which actors are in the pool: start them, replace the ones that die, grow and
release them (the elastic pool), and whether the pool can serve at all.

Pure asyncio and no Ray, like :mod:`ray_alpcrun.pool.dispatch`. :class:`Membership`
keeps the row of :class:`Member` s (one per index) and their replacements; a
dispatcher decides which member runs what, and sees the membership only as a
:class:`~ray_alpcrun.pool.interfaces.Roster` (the seams are in
:mod:`ray_alpcrun.pool.interfaces`).

Decisions (issue 18):

* A lost actor is replaced at its index for as long as the pool runs. Start
  attempts back off exponentially from ``restart_backoff_s`` to at most
  ``restart_backoff_max_s``; every failure is logged with its reason. (It used
  to give up after three attempts: a fixed pool that had lost its actors then
  answered every task of every session with an error, at full speed.)
* With no live actor, batches wait for one. The pool is *unavailable* ("given
  up for now") once no actor has been live for ``no_actor_grace_s``; an elastic
  pool is allowed to wait for room without limit, and becomes unavailable only
  when its starts have been failing for that long. The owner (the bridge) stops
  taking work while the pool is unavailable, and the dispatcher answers the
  batches it holds with :class:`~ray_alpcrun.errors.PoolUnavailable`; the
  first live actor makes the pool serve again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from ray_alpcrun.errors import ActorLost, HandlerError
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.interfaces import (
    CLOSED,
    SERVING,
    UNAVAILABLE,
    WAITING,
    Availability,
    Backend,
    CallResult,
    Calls,
    Lifecycle,
    Listener,
    Listeners,
    Member,
    Roster,
)

# The seams live in interfaces.py; these names stay importable from here.
__all__ = [
    "CLOSED",
    "SERVING",
    "UNAVAILABLE",
    "WAITING",
    "Availability",
    "Backend",
    "CallResult",
    "Calls",
    "Lifecycle",
    "Listener",
    "Member",
    "Membership",
    "Roster",
]

log = logging.getLogger(__name__)

A = TypeVar("A")

# Starts of one of the first actors, when its process dies while it starts.
START_ATTEMPTS = 3

# A released actor's session end hooks get this long before it is killed anyway.
RETIRE_WAIT_S = 30.0

# The event loop may run a timer up to its clock resolution early.
_EPS_S = 1e-3


class Membership(Generic[A]):
    """The row of actors: ``num_actors`` of them unless the owner adds and retires
    actors with :meth:`grow` and :meth:`release` (the elastic pool). A member that
    dies is replaced at its index, for as long as the pool runs (module docstring).

    >>> m = Membership(backend, num_actors=2)       # doctest: +SKIP
    >>> await m.start()                              # doctest: +SKIP
    >>> m.availability().state                       # doctest: +SKIP
    'serving'
    """

    def __init__(
        self,
        backend: Lifecycle[A],
        *,
        num_actors: int,
        elastic: bool = False,
        restart_backoff_s: float = 0.5,
        restart_backoff_max_s: float = 30.0,
        no_actor_grace_s: float = 60.0,
        busy_elsewhere: Callable[[Member[A]], int] | None = None,
    ) -> None:
        if num_actors < (0 if elastic else 1):
            raise ValueError("num_actors must be at least 1")
        self._backend = backend
        self._num_actors = num_actors
        self._backoff_s = restart_backoff_s
        self._backoff_max_s = max(restart_backoff_s, restart_backoff_max_s)
        self._grace_s = no_actor_grace_s
        # Tasks in flight on a member in other dispatchers (node bridges): never released then.
        self._busy_elsewhere: Callable[[Member[A]], int] = busy_elsewhere or (lambda m: 0)
        self._elastic = elastic
        self._members: list[Member[A] | None] = []
        self._restarting: set[int] = set()
        self._starting: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners = Listeners()
        self._closed = False
        self._state = ""  # none before the first change: start() is no transition to log
        self._no_live_since: float | None = None  # loop time the last live actor left
        self._failing_since: float | None = None  # first failed start since the last success
        self._timer: asyncio.TimerHandle | None = None
        self.released = 0
        """Actors retired by :meth:`release`: idle ones, and ones withdrawn while starting."""
        self.requested = 0
        """Actors asked for by :meth:`grow` (the elastic pool scaling up)."""
        self.start_error: str | None = None
        """Why the last actor start failed, if it did (cleared by a success)."""
        self.start_failures = 0
        """Failed start attempts since start."""
        self.restarts = 0
        """Actors replaced since start (died, unreachable or hung)."""

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

    def availability(self) -> Availability:
        """The pool's state now, with its reason (see the module docstring)."""
        live, pending = len(self.members()), len(self._restarting)
        no_live_s: float | None = None
        if self._closed:
            state, why = CLOSED, "the actor pool is closed"
        elif live:
            state, why = SERVING, f"{live} actor(s) live, {pending} starting"
        else:
            now = asyncio.get_running_loop().time()
            no_live_s = now - self._no_live_since if self._no_live_since is not None else 0.0
            failure = f"; last start failure: {self.start_error}" if self.start_error else ""
            if self._state == UNAVAILABLE:
                state = UNAVAILABLE
                why = (
                    f"no live actor for {no_live_s:.1f} s (more than {self._grace_s:g} s): "
                    f"not taking work until one is live ({pending} starting{failure})"
                )
            elif pending:
                state = WAITING
                why = f"no live actor; batches wait for one of {pending} starting{failure}"
            else:
                state = WAITING
                why = f"no live actor; batches wait until the pool asks for one{failure}"
        return Availability(
            state,
            why,
            live=live,
            pending=pending,
            no_live_s=no_live_s,
            start_error=self.start_error,
            start_failures=self.start_failures,
        )

    def watch(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(availability)`` after every change; returns the unsubscribe."""
        return self._listeners.add(listener)

    def lost(self, member: Member[A], reason: str, *, killed: bool = False) -> None:
        """``member`` died, became unreachable or hung: kill it and start a replacement."""
        if killed:
            member.killed = True
        if not member.alive:
            return  # already being replaced
        member.alive = False
        self.restarts += 1
        log.warning(
            "replacing actor",
            extra=fields(actor=member.index, reason=reason, restarts=self.restarts),
        )
        # It may only be unreachable, or hung: the backend makes sure that process goes.
        if self._closed:
            self._backend.kill(member.actor)
        else:
            self._backend.recycle(member.actor)
            self._spawn(member.index)
        self._changed()

    async def start(self) -> None:
        """Start every actor; on any failure stop the others and re-raise it."""
        started = await asyncio.gather(
            *(self._start_one() for _ in range(self._num_actors)),
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
        self._changed()

    async def _start_one(self) -> A:
        """One actor of the first ones; started again if its process died meanwhile
        (the outside chaos run killed actors as they started: each such kill ended
        the CLI with exit 6, "handler: pool actor failed to start")."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await self._backend.start_actor()
            except ActorLost as exc:
                if attempt == START_ATTEMPTS:
                    raise HandlerError(
                        f"pool actor failed to start: {exc} ({attempt} attempts)"
                    ) from exc
                log.warning("a pool actor died while it started; starting another",
                            extra=fields(attempt=attempt, error=str(exc)))  # fmt: skip
        raise AssertionError("unreachable")

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
            self.requested += 1
            self._spawn(index)
        if count > 0:
            self._changed()

    def release(self, count: int) -> int:
        """Retire up to ``count`` actors: pending ones first, then the longest idle.

        A live actor goes only with nothing in flight; it is out of the pool at
        once (no new work reaches it), then its sessions' end hooks run and it
        stops. Returns how many went.
        """
        done = 0
        for index in sorted(self._restarting, reverse=True):
            if done >= count:
                break
            task = self._starting.get(index)
            if task is not None and not task.done():
                task.cancel()  # the backend kills an actor that was still starting
                self._restarting.discard(index)
                self.released += 1  # counted as a release (a CI run counted it under load only)
                done += 1
        idle = sorted(
            (m for m in self.members() if m.inflight == 0 and not self._busy_elsewhere(m)),
            key=_idle_since,
        )
        for m in idle[: max(0, count - done)]:
            m.alive = False
            m.killed = True
            self._members[m.index] = None
            self.released += 1
            done += 1
            task = asyncio.create_task(self._retire(m))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if done:
            self._changed()
        return done

    async def _retire(self, member: Member[A]) -> None:
        try:
            # Bounded: a hung handler holds the lock the end hooks wait for.
            await asyncio.wait_for(self._backend.retire(member.actor), RETIRE_WAIT_S)
        except asyncio.TimeoutError:
            log.warning(
                "releasing an actor: its session ends did not answer; killing it",
                extra=fields(actor=member.index, after_s=RETIRE_WAIT_S),
            )
        except Exception as exc:
            log.warning(
                "releasing an actor failed", extra=fields(actor=member.index, error=str(exc))
            )
        finally:
            self._backend.kill(member.actor)

    async def settle(self) -> None:
        """Wait until no actor start is pending (back to full size, or closed)."""
        while self._restarting and not self._closed:
            changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(_: Availability, changed: asyncio.Future[None] = changed) -> None:
                if not changed.done():
                    changed.set_result(None)

            unwatch = self.watch(wake)
            try:
                await changed
            finally:
                unwatch()

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
        self._changed()

    # -- internals --------------------------------------------------------

    def _spawn(self, index: int) -> None:
        self._restarting.add(index)
        task = asyncio.create_task(self._restart(index))
        self._starting[index] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        failed = 0
        try:
            while not self._closed:
                try:
                    actor = await self._backend.start_actor()
                except Exception as exc:
                    failed += 1
                    self.start_failures += 1
                    self.start_error = str(exc)
                    if self._failing_since is None:
                        self._failing_since = loop.time()
                    # Capped exponent: the delay stays a float after days of failures.
                    delay_s = min(self._backoff_max_s, self._backoff_s * 2.0 ** min(failed - 1, 30))
                    log.warning(
                        "actor start failed; trying again",
                        extra=fields(
                            actor=index, attempt=failed, error=str(exc), retry_in_s=delay_s
                        ),
                    )
                    self._changed()
                    await asyncio.sleep(delay_s)  # ok: backoff between start attempts
                    continue
                if self._closed:
                    self._backend.kill(actor)
                    return
                self.start_error = None
                self._failing_since = None
                self._members[index] = Member(actor, index, idle_since=loop.time())
                if failed:
                    log.info(
                        "actor started after failed attempts",
                        extra=fields(actor=index, failed_attempts=failed),
                    )
                return
        finally:
            if self._starting.get(index) is asyncio.current_task():
                del self._starting[index]
            self._restarting.discard(index)
            self._changed()

    def _changed(self) -> None:
        """After every change: update the state (log its transitions, arm the timer
        that ends the grace), then tell the listeners."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        live = any(m is not None and m.alive for m in self._members)
        if live:
            self._no_live_since = None
        elif self._no_live_since is None:
            self._no_live_since = now
        if not self._restarting:
            # Nothing is being started, so nothing fails: an elastic pool at zero
            # by choice waits (and takes work, which is how it grows again).
            self._failing_since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        state = self._next_state(live, now)
        if state == WAITING:
            since = self._outage_since()
            if since is not None:  # the grace runs out then, unless an actor joins first
                self._timer = loop.call_at(since + self._grace_s, self._changed)
        previous, self._state = self._state, state
        availability = self.availability()
        if state != previous and previous:
            extra = fields(state=state, reason=availability.reason)
            if state == UNAVAILABLE:
                log.error("actor pool given up for now", extra=extra)
            elif state == WAITING:
                log.warning("actor pool has no live actor; batches wait", extra=extra)
            elif state == SERVING and previous in (WAITING, UNAVAILABLE):
                log.info("actor pool serving again", extra=extra)
        self._listeners.notify(availability)

    def _next_state(self, live: bool, now: float) -> str:
        if self._closed:
            return CLOSED
        if live:
            return SERVING
        since = self._outage_since()
        if since is not None and now - since + _EPS_S >= self._grace_s:
            return UNAVAILABLE
        return WAITING

    def _outage_since(self) -> float | None:
        """Since when the pool counts as down (None: it may wait without limit).

        A fixed pool is down from the moment its last live actor left; an
        elastic pool (which also waits for a cluster to grow) only while its
        starts fail."""
        if self._no_live_since is None:
            return None
        if not self._elastic:
            return self._no_live_since
        if self._failing_since is None:
            return None
        return max(self._no_live_since, self._failing_since)


def _idle_since(member: Member[A]) -> float:
    return member.idle_since
