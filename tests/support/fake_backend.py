"""The pool's fake backend: actors are plain objects, behaviour is driven by the
payloads, nothing runs on Ray (see ``ray_alpcrun.pool.membership.Backend``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ray_alpcrun.errors import ActorLost, SessionSetupError
from ray_alpcrun.pool.dispatch import CallResult, Dispatcher
from ray_alpcrun.pool.membership import Membership
from ray_alpcrun.runtime import Outcome


@dataclass(eq=False)
class FakeActor:
    """Runs calls one at a time, like a Ray actor with max_concurrency=1."""

    name: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dead: bool = False
    calls: list[list[bytes]] = field(default_factory=list)


class FakeBackend:
    """Payload-driven behaviour:

    ``die``: kills the actor running it, every time; ``die-once``: the first
    time only; ``hang``: never returns; ``setup``: session setup fails;
    ``wait``: blocks until ``release`` is set; anything else is upper-cased.
    """

    def __init__(self) -> None:
        self.actors: list[FakeActor] = []
        self.killed: list[FakeActor] = []
        self.answered: Counter[bytes] = Counter()
        self.died_once: set[bytes] = set()
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.ended: list[tuple[int, str]] = []
        self.cost_s: float | None = None  # handler seconds per task it reports
        self.singles: Counter[int] = Counter()  # one-task calls submitted, per actor, now
        self.singles_peak = 0

    async def start_actor(self) -> FakeActor:
        actor = FakeActor(len(self.actors))
        self.actors.append(actor)
        return actor

    async def call(
        self,
        actor: FakeActor,
        session_id: str,
        payloads: list[bytes],
        shared: Any,
        tags: tuple[str, ...],
    ) -> CallResult:
        if len(payloads) == 1:
            self.singles[actor.name] += 1
            self.singles_peak = max(self.singles_peak, self.singles[actor.name])
        try:
            return await self._call(actor, payloads)
        finally:
            if len(payloads) == 1:
                self.singles[actor.name] -= 1

    async def _call(self, actor: FakeActor, payloads: list[bytes]) -> CallResult:
        await asyncio.sleep(0)  # ok: a yield, not a wait: real calls let others in meanwhile
        async with actor.lock:
            if actor.dead:
                raise ActorLost(f"actor {actor.name} is dead")
            actor.calls.append(list(payloads))
            out: list[Outcome] = []
            for p in payloads:
                if p == b"setup":
                    raise SessionSetupError("setup failed")
                if p == b"die" or (p.startswith(b"die-once") and p not in self.died_once):
                    self.died_once.add(p)
                    actor.dead = True
                    raise ActorLost(f"actor {actor.name} died")
                if p == b"hang":
                    await asyncio.Event().wait()
                if p == b"wait":
                    self.entered.set()
                    await self.release.wait()
                if p.startswith(b"fail"):
                    out.append((None, "ValueError: failed"))
                else:
                    out.append((p.upper(), None))
            for p, (result, _) in zip(payloads, out, strict=True):
                if result is not None:
                    self.answered[p] += 1
            return out, None if self.cost_s is None else self.cost_s * len(payloads)

    def kill(self, actor: FakeActor) -> None:
        actor.dead = True
        self.killed.append(actor)

    def recycle(self, actor: FakeActor) -> None:
        self.kill(actor)  # a fake actor is never started again: the next start makes one

    async def end_session(self, actor: FakeActor, session_id: str) -> None:
        if actor.dead:
            raise ActorLost("dead")
        self.ended.append((actor.name, session_id))

    async def retire(self, actor: FakeActor) -> None:
        self.ended.append((actor.name, "*"))  # every session's end hook ran there


def payloads(n: int, prefix: str = "t") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


class Pool(NamedTuple):
    """A membership and the dispatcher on it, over one fake backend."""

    membership: Membership[FakeActor]
    dispatcher: Dispatcher[FakeActor]


_MEMBERSHIP_ARGS = (
    "num_actors",
    "elastic",
    "restart_backoff_s",
    "restart_backoff_max_s",
    "no_actor_grace_s",
)


def pool(backend: FakeBackend, **kwargs: Any) -> Pool:
    """A membership (2 actors unless told) and a dispatcher (chunks of 1 unless
    told) over ``backend``; each takes its own keyword arguments."""
    kwargs.setdefault("num_actors", 2)
    kwargs.setdefault("min_chunk", 1)
    own = {k: kwargs.pop(k) for k in _MEMBERSHIP_ARGS if k in kwargs}
    membership: Membership[FakeActor] = Membership(backend, **own)
    return Pool(membership, Dispatcher(membership, backend, **kwargs))


async def started(backend: FakeBackend, **kwargs: Any) -> Pool:
    """:func:`pool`, started."""
    p = pool(backend, **kwargs)
    await p.membership.start()
    return p
