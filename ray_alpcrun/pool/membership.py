"""Which actors are in the pool: start them, replace the ones that die, grow and
release them (the elastic pool).

Pure asyncio and no Ray, like :mod:`ray_alpcrun.pool.dispatch`, which builds on
it: :class:`Membership` keeps the row of :class:`Member` s (one per index) and
their replacements; the dispatcher decides which member runs what.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ray_alpcrun.logs import fields
from ray_alpcrun.runtime import Outcome

log = logging.getLogger(__name__)

A = TypeVar("A")

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
        shared: object,
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


class Membership(Generic[A]):
    """The row of actors: ``num_actors`` of them unless the owner adds and retires
    actors with :meth:`grow` and :meth:`release` (the elastic pool). A member that
    dies is replaced at its index (:meth:`_replace`), up to ``restart_attempts``
    tries with exponential backoff."""

    def __init__(
        self,
        backend: Backend[A],
        *,
        num_actors: int,
        restart_attempts: int = 3,
        restart_backoff_s: float = 0.5,
        elastic: bool = False,
    ) -> None:
        if num_actors < (0 if elastic else 1):
            raise ValueError("num_actors must be at least 1")
        self._backend = backend
        self._num_actors = num_actors
        self._restart_attempts = restart_attempts
        self._restart_backoff_s = restart_backoff_s
        self._elastic = elastic
        self._members: list[Member[A] | None] = []
        self._restarting: set[int] = set()
        self._starting: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closed = False
        self.released = 0
        """Idle actors retired by :meth:`release`."""
        self.start_error: str | None = None
        """Why the last actor start failed, if it did (cleared by a success)."""
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


def _idle_since(member: Member[A]) -> float:
    return member.idle_since
