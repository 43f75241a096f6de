"""A pool that lost every actor comes back (issue 18, item 1), against the fake
backend: replacements never stop, batches wait while no actor is live, the pool
gives up for now after its grace and serves again with the first live actor.
No Ray; timers are milliseconds, and every wait is for an event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from ray_alpcrun.errors import ActorLost, HandlerError, PoolUnavailable
from ray_alpcrun.pool.membership import SERVING, UNAVAILABLE, WAITING, Availability, Membership
from tests.support.fake_backend import FakeActor, FakeBackend, payloads, started

pytestmark = pytest.mark.timeout(30)
FAST = {"restart_backoff_s": 0.001, "restart_backoff_max_s": 0.004}


class BrokenStarts(FakeBackend):
    """While ``broken``, every actor start fails as a handler module that cannot be
    imported does; ``failed`` is set once ``fail_until`` starts have failed."""

    def __init__(self, fail_until: int = 1 << 30) -> None:
        super().__init__()
        self.broken = False
        self.failures = 0
        self.fail_until = fail_until
        self.failed = asyncio.Event()

    async def start_actor(self) -> FakeActor:
        if self.broken:
            self.failures += 1
            if self.failures >= self.fail_until:
                self.failed.set()
            raise RuntimeError("ModuleNotFoundError: No module named 'handlers'")
        return await super().start_actor()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self, message: str) -> list[dict[str, object]]:
        return [getattr(r, "alpcrun_fields", {}) for r in self.records if r.getMessage() == message]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("ray_alpcrun.pool.membership")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def states(m: Membership[FakeActor]) -> list[str]:
    """The states the pool goes through from now on, each once in a row."""
    seen: list[str] = []

    def note(a: Availability) -> None:
        if not seen or seen[-1] != a.state:
            seen.append(a.state)

    m.watch(note)
    return seen


async def until(m: Membership[FakeActor], state: str) -> None:
    reached = asyncio.get_running_loop().create_future()

    def check(a: Availability) -> None:
        if a.state == state and not reached.done():
            reached.set_result(None)

    unwatch = m.watch(check)
    try:
        if m.availability().state != state:
            await reached
    finally:
        unwatch()


async def test_a_fixed_pool_keeps_replacing_its_lost_actor_with_backoff(records: Records) -> None:
    # The only actor dies while starts fail: far past the old three attempts, the
    # batch waits, and once a start works again it is answered in full.
    backend = BrokenStarts(fail_until=8)
    m, d = await started(backend, num_actors=1, **FAST)
    backend.broken = True
    run = asyncio.ensure_future(d.run("s", [b"die-once", b"a"]))
    await backend.failed.wait()
    assert not run.done() and m.availability().state == WAITING
    backend.broken = False
    assert await run == [(b"DIE-ONCE", None), (b"A", None)]
    assert m.restarts == 1 and m.start_failures >= 8 and m.start_error is None
    failures = records.fields("actor start failed; trying again")
    assert len(failures) == m.start_failures  # every attempt logged, with its reason
    assert all("No module named" in str(f["error"]) for f in failures)
    delays = [f["retry_in_s"] for f in failures]
    assert delays[:4] == [0.001, 0.002, 0.004, 0.004]  # doubling, capped
    await m.close()


async def test_with_no_live_actor_a_new_batch_gets_its_task_timeout_a_retry_waits() -> None:
    backend = BrokenStarts(fail_until=1)
    m, d = await started(backend, num_actors=1, task_timeout_s=0.05, **FAST)
    backend.broken = True
    # Its actor dies under it: the retry waits for the replacement, however long
    # (bounded by the grace), so that no neighbour of a crash fails for it.
    retried = asyncio.ensure_future(d.run("s", [b"die-once", b"a"]))
    await backend.failed.wait()
    # A batch that cannot start waits at most its task timeout.
    assert await d.run("s", payloads(3)) == [(None, "task timed out after 0.05 s")] * 3
    assert not retried.done() and m.availability().state == WAITING
    backend.broken = False
    assert await retried == [(b"DIE-ONCE", None), (b"A", None)]
    await m.close()


async def test_past_the_grace_the_pool_gives_up_for_now_and_serves_again() -> None:
    backend = BrokenStarts()
    m, d = await started(backend, num_actors=1, no_actor_grace_s=0.05, **FAST)
    seen = states(m)
    backend.broken = True
    waiting = asyncio.ensure_future(d.run("s", [b"die"]))
    with pytest.raises(PoolUnavailable, match="last start failure: ModuleNotFoundError"):
        await waiting  # held while the pool waited, answered once it gave up
    a = m.availability()
    assert a.state == UNAVAILABLE and not a.takes_work
    assert a.start_error is not None and "No module named" in a.start_error
    with pytest.raises(PoolUnavailable):
        await d.run("s", payloads(2))  # at once: nothing waits while given up
    backend.broken = False
    await until(m, SERVING)
    assert await d.run("s", payloads(2)) == [(p.upper(), None) for p in payloads(2)]
    assert seen == [WAITING, UNAVAILABLE, SERVING]
    await m.close()


async def test_an_elastic_pool_at_zero_waits_through_failed_starts() -> None:
    # It used to answer "no pool actor could start" at once.
    backend = BrokenStarts(fail_until=3)
    backend.broken = True
    m, d = await started(backend, num_actors=0, elastic=True, **FAST)
    m.grow(1)
    run = asyncio.ensure_future(d.run("s", [b"a"]))
    await backend.failed.wait()
    assert not run.done()
    backend.broken = False
    assert await run == [(b"A", None)]
    await m.close()


class NoRoom(FakeBackend):
    """Starts wait for room that never comes (a cluster still growing)."""

    async def start_actor(self) -> FakeActor:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_an_elastic_pool_waiting_for_room_is_not_given_up() -> None:
    backend = NoRoom()
    m, _ = await started(backend, num_actors=0, elastic=True, no_actor_grace_s=0.0)
    m.grow(1)  # a grace of 0 would run out at once, if it counted here
    assert m.availability().state == WAITING and m.pending == 1
    await m.close()
    assert m.availability().state == "closed"


async def test_an_actor_withdrawn_while_it_starts_counts_as_released() -> None:
    # A CI run: the pool's second actor was still starting when the load fell;
    # withdrawing it counted a release under load but no release, so the two
    # figures disagreed and the chaos run missed a scale-down under load.
    backend = NoRoom()
    m, _ = await started(backend, num_actors=0, elastic=True)
    m.grow(2)
    assert (m.requested, m.pending, m.released) == (2, 2, 0)
    assert m.release(1) == 1
    assert (m.pending, m.released) == (1, 1)
    await m.close()


async def test_an_elastic_pool_whose_starts_fail_gives_up_until_it_stops_asking() -> None:
    backend = BrokenStarts()
    backend.broken = True
    m, _ = await started(backend, num_actors=0, elastic=True, no_actor_grace_s=0.0, **FAST)
    m.grow(1)
    await until(m, UNAVAILABLE)
    # With nothing being started nothing fails: it takes work again, which is
    # how demand reaches it and it grows.
    assert m.release(1) == 1
    assert m.availability().state == WAITING
    await m.close()


class DiesOnceAtStart(FakeBackend):
    """The first actor start fails as a Ray actor killed while it starts does."""

    def __init__(self) -> None:
        super().__init__()
        self.deaths = 0

    async def start_actor(self) -> FakeActor:
        if self.deaths == 0:
            self.deaths += 1
            raise ActorLost("pool actor died while it started: killed")
        return await super().start_actor()


async def test_an_actor_killed_while_the_pool_starts_is_started_again() -> None:
    # Issue 23's outside chaos run: an actor killed as the pool started ended the
    # CLI with exit 6 ("handler: pool actor failed to start"), a full restart.
    backend = DiesOnceAtStart()
    m, _ = await started(backend, num_actors=2)
    assert backend.deaths == 1 and len(backend.actors) == 2
    assert m.availability().state == SERVING and m.availability().live == 2
    await m.close()


async def test_an_actor_that_dies_at_every_start_fails_the_start_as_a_handler_error() -> None:
    class AlwaysDies(FakeBackend):
        async def start_actor(self) -> FakeActor:
            raise ActorLost("pool actor died while it started: cannot join")

    with pytest.raises(HandlerError, match=r"cannot join \(3 attempts\)"):
        await started(AlwaysDies(), num_actors=1)
