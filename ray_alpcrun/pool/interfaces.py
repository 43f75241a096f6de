"""The pool's seams, in one place: what the membership needs from a backend
(:class:`Lifecycle`), what a dispatcher needs from it (:class:`Calls`), and what
a dispatcher may see of the membership (:class:`Roster`: the live
:class:`Member` s, what is pending, the pool's :class:`Availability`, a way to
report a member lost, and a change notification).

Kept this narrow on purpose: one membership (one decision about which actors
the pool has) can then serve several dispatchers, and each side is tested
against a fake of the other. Pure typing and dataclasses: no asyncio work, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ray_alpcrun.runtime import Outcome

A = TypeVar("A")
A_contra = TypeVar("A_contra", contravariant=True)

# What an actor answers for a sub-batch: outcomes in order, and the seconds the
# handler spent on them (None if unknown).
CallResult = tuple[list[Outcome], float | None]

# The pool's states (:attr:`Availability.state`).
SERVING = "serving"  # at least one live actor
WAITING = "waiting"  # none live; batches wait for one
UNAVAILABLE = "unavailable"  # none live for too long: given up for now
CLOSED = "closed"


class Lifecycle(Protocol[A]):
    """How the membership creates and stops actors of type ``A``."""

    async def start_actor(self) -> A:
        """Create one actor and return once it is ready to take calls."""

    def kill(self, actor: A) -> None:
        """Stop the actor now (it may already be dead)."""

    def recycle(self, actor: A) -> None:
        """Hand a lost actor to the next :meth:`start_actor`, which takes it back
        once started again (stopping its old process first if that is still
        there), or :meth:`kill` it where it cannot be started again."""

    async def retire(self, actor: A) -> None:
        """Retire an idle actor: run every session's end hook there, then stop it."""


class Calls(Protocol[A_contra]):
    """How a dispatcher reaches actors of type ``A``."""

    async def call(
        self,
        actor: A_contra,
        session_id: str,
        payloads: list[bytes],
        shared: object,
        tags: tuple[str, ...],
    ) -> CallResult:
        """Run a sub-batch; one outcome per payload, in order, and the handler's time.

        Raises :class:`ActorLost` if the actor is gone and
        :class:`~ray_alpcrun.errors.SessionSetupError` if nothing could run.
        """

    async def end_session(self, actor: A_contra, session_id: str) -> None:
        """Release the session's state on that actor."""


class Backend(Lifecycle[A], Calls[A], Protocol[A]):
    """Both halves: what one backend (ordinary Ray calls, the direct path) offers."""


@dataclass(eq=False, slots=True)
class Member(Generic[A]):
    """One incarnation of an actor at one index of the pool.

    ``inflight`` and ``idle_since`` are the load, kept by the dispatcher that
    runs calls on the member; the membership reads them to release idle actors.
    """

    actor: A
    index: int
    inflight: int = 0  # tasks submitted and not answered
    alive: bool = True
    idle_since: float = 0.0  # loop time when ``inflight`` last dropped to zero
    # Killed by us (timeout, close): deaths of its other calls are not their tasks' fault.
    killed: bool = False


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether the pool serves: ``state`` is one of ``serving``, ``waiting``,
    ``unavailable`` (given up for now) and ``closed``; ``reason`` says why, for
    the log, ``/status`` and ``/readyz``."""

    state: str
    reason: str
    live: int = 0
    pending: int = 0
    no_live_s: float | None = None  # seconds without a live actor (None while one is)
    start_error: str | None = None  # why the last actor start failed, if it did
    start_failures: int = 0  # failed start attempts since the pool started

    @property
    def takes_work(self) -> bool:
        """True while batches may come: an actor is live, or one is waited for."""
        return self.state in (SERVING, WAITING)


Listener = Callable[[Availability], None]


class Listeners:
    """Who watches a pool's state: :meth:`add` one (it returns the unsubscribe),
    :meth:`notify` them all (each of the pool's layers keeps one of these)."""

    def __init__(self) -> None:
        self._all: list[Listener] = []

    def add(self, listener: Listener) -> Callable[[], None]:
        self._all.append(listener)

        def unwatch() -> None:
            if listener in self._all:
                self._all.remove(listener)

        return unwatch

    def notify(self, availability: Availability) -> None:
        for listener in list(self._all):
            listener(availability)


class Roster(Protocol[A]):
    """What a dispatcher needs from the membership, and all it may touch."""

    def members(self) -> list[Member[A]]:
        """The live members now."""

    @property
    def pending(self) -> int:
        """Members asked for and not live yet."""

    def availability(self) -> Availability:
        """Whether the pool serves, waits for an actor, gave up for now, or closed."""

    def lost(self, member: Member[A], reason: str, *, killed: bool = False) -> None:
        """``member`` died or hung (``killed``: we stop it): replace it."""

    def watch(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after every change of the row (a member joined or
        left, a start failed, the state changed); returns the unsubscribe."""
