"""Dispatch logic against a fake backend: no Ray, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from ray_alpcrun.errors import ActorLost, SessionSetupError
from ray_alpcrun.pool.dispatch import CallResult, Dispatcher, plan_chunks
from ray_alpcrun.pool.membership import Availability, Listener, Member, Membership
from tests.support.fake_backend import FakeActor, FakeBackend, payloads, pool, started

# -- plan_chunks ------------------------------------------------------------------


def test_plan_keeps_small_batches_whole_and_splits_big_ones_evenly() -> None:
    assert plan_chunks([0, 0, 0, 0], 3, 16) == [(0, 3)]
    assert plan_chunks([0, 0], 1000, 16) == [(0, 500), (1, 500)]
    assert plan_chunks([0, 0, 0], 10, 1) == [(0, 4), (1, 3), (2, 3)]
    assert plan_chunks([0] * 8, 40, 16) == [(0, 20), (1, 20)]
    assert plan_chunks([], 5, 1) == []
    assert plan_chunks([3], 0, 1) == []


def test_plan_fills_the_least_loaded_first() -> None:
    # Actor 0 already has 100 tasks queued: all 60 go to actor 1.
    assert plan_chunks([100, 0], 60, 1) == [(1, 60)]
    # Loads 10 and 0, 30 new tasks: even out at 20 each.
    assert plan_chunks([10, 0], 30, 1) == [(1, 20), (0, 10)]
    # A chunk under min_chunk is folded into the others.
    assert plan_chunks([10, 0], 30, 16) == [(1, 30)]


@pytest.mark.parametrize("loads", [[0, 0], [5, 0, 9], [1, 2, 3, 4], [50, 0, 0]])
@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_plan_covers_every_task_once(loads: list[int], n: int) -> None:
    plan = plan_chunks(loads, n, 4)
    assert sum(c for _, c in plan) == n
    assert len({i for i, _ in plan}) == len(plan)
    assert all(c > 0 for _, c in plan)


# -- run ---------------------------------------------------------------------------


async def test_one_call_per_actor_per_sub_batch_in_order() -> None:
    backend = FakeBackend()
    _, d = await started(backend)
    batch = payloads(10)
    out = await d.run("s", batch)
    assert out == [(p.upper(), None) for p in batch]
    assert [len(a.calls) for a in backend.actors] == [1, 1]
    assert backend.actors[0].calls[0] + backend.actors[1].calls[0] == batch


async def test_handler_errors_stay_per_task() -> None:
    _, d = await started(FakeBackend())
    out = await d.run("s", [b"a", b"fail", b"c"])
    assert out == [(b"A", None), (None, "ValueError: failed"), (b"C", None)]


async def test_least_loaded_gets_the_next_batch() -> None:
    backend = FakeBackend()
    _, d = await started(backend, min_chunk=100)
    busy = asyncio.create_task(d.run("s", [b"wait"]))
    await backend.entered.wait()
    # Actor 0 holds the waiting task: the next two batches go to actor 1.
    assert await d.run("s", [b"x"]) == [(b"X", None)]
    assert await d.run("s", [b"y"]) == [(b"Y", None)]
    assert backend.actors[1].calls == [[b"x"], [b"y"]]
    backend.release.set()
    assert await busy == [(b"WAIT", None)]


async def test_actor_death_retries_on_a_live_actor_exactly_once() -> None:
    backend = FakeBackend()
    m, d = await started(backend)
    batch = [*payloads(5), b"die-once", *payloads(4, "u")]
    out = await d.run("s", batch)
    assert out == [(p.upper(), None) for p in batch]
    assert m.restarts == 1
    assert len(backend.actors) == 3  # two at start, one replacement
    assert set(backend.answered.values()) == {1}
    assert sum(backend.answered.values()) == len(batch)


async def test_a_task_that_always_kills_its_actor_fails_alone() -> None:
    backend = FakeBackend()
    m, d = await started(backend, max_call_retries=2)
    batch = [b"a", b"b", b"die", b"c", b"d", b"e"]
    out = await d.run("s", batch)
    for p, outcome in zip(batch, out, strict=True):
        if p == b"die":
            assert outcome[0] is None
            assert outcome[1] is not None and outcome[1].startswith("actor died 3 times")
        else:
            assert outcome == (p.upper(), None)
    assert set(backend.answered.values()) == {1}
    # Two deaths of the sub-batch, then three of the culprit alone: only deaths
    # while a task runs alone count against it.
    assert m.restarts == 5
    # Isolated tasks never queue behind each other: a crash takes only its own task.
    assert backend.singles_peak == 1


async def test_without_retries_only_the_culprit_fails() -> None:
    _, d = await started(FakeBackend(), num_actors=1, max_call_retries=0)
    out = await d.run("s", [b"a", b"die"])
    assert out[0] == (b"A", None)
    assert out[1][0] is None and out[1][1] and "actor died 1 times" in out[1][1]


async def test_neighbours_of_repeated_crashes_never_fail() -> None:
    # Many crashing tasks spread over concurrent batches: every other task still
    # gets its result, however often its sub-batch shared an actor with a crash.
    backend = FakeBackend()
    _, d = await started(backend, num_actors=2, max_call_retries=1)
    batches = [[*payloads(4, f"b{j}-"), b"die", *payloads(3, f"c{j}-")] for j in range(4)]
    outs = await asyncio.gather(*(d.run("s", b) for b in batches))
    for batch, out in zip(batches, outs, strict=True):
        for p, (result, error) in zip(batch, out, strict=True):
            if p == b"die":
                assert result is None and error and error.startswith("actor died 2 times")
            else:
                assert (result, error) == (p.upper(), None)
    assert set(backend.answered.values()) == {1}
    # Isolated tasks of different batches never share an actor either: queued
    # calls travel together, so a hung one would hold its neighbours' replies.
    assert backend.singles_peak == 1


async def test_hung_task_times_out_and_the_others_succeed() -> None:
    backend = FakeBackend()
    m, d = await started(backend, task_timeout_s=0.05, timeout_slack_s=0.05)
    batch = [*payloads(3), b"hang", *payloads(3, "u")]
    out = await d.run("s", batch)
    for p, outcome in zip(batch, out, strict=True):
        if p == b"hang":
            assert outcome == (None, "task timed out after 0.05 s")
        else:
            assert outcome == (p.upper(), None)
    assert set(backend.answered.values()) == {1}
    assert m.restarts >= 1
    assert backend.killed  # the stuck actor was killed


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):  # a backstop: the dispatcher's counters have no event
        if condition():
            return
        await asyncio.sleep(0.001)  # ok: polls a counter
    raise AssertionError("condition not reached")


async def test_a_task_that_timed_out_behind_a_hung_call_is_not_blamed() -> None:
    # The chaos run (issue 23): a one-task call queued behind another batch's hung
    # sub-batch; its own budget (counted from a moment with less in flight) ran
    # out first, and the innocent task was answered "task timed out".
    backend = FakeBackend()
    m, d = await started(backend, num_actors=1, task_timeout_s=0.05, timeout_slack_s=0.05)
    [member] = m.members()
    first = asyncio.ensure_future(d.run("w", [b"wait", *payloads(15)]))
    await backend.entered.wait()
    hung = asyncio.ensure_future(d.run("z", [b"hang", b"z1", b"z2", b"z3"]))
    await _until(lambda: member.inflight == 20)  # its budget: 20 tasks' worth
    backend.release.set()
    assert await first == [(b"WAIT", None), *[(p.upper(), None) for p in payloads(15)]]
    innocent = await d.run("y", [b"y"])  # behind the hang, with 5 in flight: a shorter budget
    assert innocent == [(b"Y", None)]
    out = await hung
    assert out[0] == (None, "task timed out after 0.05 s") and out[1:] == [
        (b"Z1", None), (b"Z2", None), (b"Z3", None)
    ]  # fmt: skip


async def test_session_setup_error_propagates() -> None:
    _, d = await started(FakeBackend())
    with pytest.raises(SessionSetupError):
        await d.run("s", [b"a", b"setup", b"c", b"d"])


async def test_concurrent_batches_all_answered() -> None:
    backend = FakeBackend()
    _, d = await started(backend, num_actors=3, min_chunk=2)
    batches = [payloads(n, f"b{n}-") for n in (1, 5, 17, 40)]
    outs = await asyncio.gather(*(d.run("s", b) for b in batches))
    for b, out in zip(batches, outs, strict=True):
        assert out == [(p.upper(), None) for p in b]


async def test_end_session_fans_out_to_every_live_actor() -> None:
    backend = FakeBackend()
    _, d = await started(backend, num_actors=3)
    await d.end_session("s9")
    assert sorted(backend.ended) == [(0, "s9"), (1, "s9"), (2, "s9")]


async def test_closed_pool_answers_errors() -> None:
    backend = FakeBackend()
    m, d = await started(backend)
    await m.close()
    out = await d.run("s", [b"a"])
    assert out == [(None, "the actor pool is closed")]
    assert len(backend.killed) == 2


async def test_failed_start_stops_the_actors_that_did_start() -> None:
    class HalfBroken(FakeBackend):
        async def start_actor(self) -> FakeActor:
            actor = await super().start_actor()
            if actor.name == 1:
                raise RuntimeError("no handler")
            return actor

    backend = HalfBroken()
    with pytest.raises(RuntimeError, match="no handler"):
        await pool(backend, num_actors=2).membership.start()
    assert backend.killed == [backend.actors[0]]


async def test_with_every_actor_dead_the_retry_waits_for_a_replacement() -> None:
    backend = FakeBackend()
    m, d = await started(backend, num_actors=1)
    out = await d.run("s", [b"a", b"die-once", b"c"])
    assert out == [(b"A", None), (b"DIE-ONCE", None), (b"C", None)]
    await m.settle()
    assert m.restarts == 1 and len(m.members()) == 1


async def test_measured_cheap_tasks_stay_in_one_call_and_costly_ones_split() -> None:
    backend = FakeBackend()
    _, d = await started(backend, min_chunk=4, min_chunk_work_s=0.01)
    assert d.chunk_floor() == 4  # nothing measured yet
    backend.cost_s = 1e-6
    await d.run("s", payloads(100))
    assert d.task_cost_s == pytest.approx(1e-6)
    before = sum(len(a.calls) for a in backend.actors)
    await d.run("s", payloads(1000))
    assert sum(len(a.calls) for a in backend.actors) == before + 1
    backend.cost_s = 0.005
    for _ in range(30):  # the running estimate follows the new cost
        await d.run("s", payloads(1))
    assert d.chunk_floor() == 4
    before = sum(len(a.calls) for a in backend.actors)
    await d.run("s", payloads(100))
    assert sum(len(a.calls) for a in backend.actors) == before + 2


async def test_isolated_tasks_never_share_an_actor() -> None:
    class SlowRestarts(FakeBackend):
        """The second replacement waits until an actor died a third time."""

        def __init__(self) -> None:
            super().__init__()
            self.third_death = asyncio.Event()

        async def start_actor(self) -> FakeActor:
            if len(self.actors) >= 3:
                await self.third_death.wait()
            return await super().start_actor()

        async def _call(self, actor: FakeActor, payloads: list[bytes]) -> CallResult:
            try:
                return await super()._call(actor, payloads)
            except ActorLost:
                if sum(a.dead for a in self.actors) >= 3:
                    self.third_death.set()
                raise

    backend = SlowRestarts()
    _, d = await started(backend, min_chunk=100)
    out = await d.run("s", [b"a", b"die", b"b", b"c"])
    assert [o[0] for o in out] == [b"A", None, b"B", b"C"]
    assert backend.singles_peak == 1


# -- load given back, waiters woken one at a time (issue 18, items 5 and 7) ----------


async def test_a_batch_cancelled_before_its_sub_batches_start_gives_back_its_load() -> None:
    backend = FakeBackend()
    m, d = await started(backend, elastic=True)
    for _ in range(3):  # repeated aborts used to leave 2, 4, 6 in flight on idle actors
        run = asyncio.ensure_future(d.run("s", payloads(4)))
        await asyncio.sleep(0)  # ok: one step: the load is reserved, the calls not started
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert [x.inflight for x in m.members()] == [0, 0]
    assert not any(a.calls for a in backend.actors)
    assert m.release(2) == 2  # idle, so an elastic pool can let them go


class CountingRoster:
    """The membership as the dispatcher sees it, counting its looks at the members."""

    def __init__(self, inner: Membership[FakeActor]) -> None:
        self.inner = inner
        self.looks = 0

    def members(self) -> list[Member[FakeActor]]:
        self.looks += 1
        return self.inner.members()

    @property
    def pending(self) -> int:
        return self.inner.pending

    def availability(self) -> Availability:
        return self.inner.availability()

    def lost(self, member: Member[FakeActor], reason: str, *, killed: bool = False) -> None:
        self.inner.lost(member, reason, killed=killed)

    def watch(self, listener: Listener) -> Callable[[], None]:
        return self.inner.watch(listener)


class OneStarts(FakeBackend):
    """The first actor starts; the others wait for room that never comes."""

    async def start_actor(self) -> FakeActor:
        if self.actors:
            await asyncio.Event().wait()
        return await super().start_actor()


async def test_a_completed_call_wakes_one_waiting_batch_not_all() -> None:
    # One live actor and one pending: admission is capped at two sub-batches, so
    # a burst waits in line. Every completed call used to wake every waiter
    # (10,000 looks at the pool for 200 one-task batches); now each admission
    # costs a bounded number of looks.
    backend = OneStarts()
    membership: Membership[FakeActor] = Membership(backend, num_actors=1)
    await membership.start()
    membership.grow(1)
    roster = CountingRoster(membership)
    d = Dispatcher(roster, backend, min_chunk=1)
    first = asyncio.ensure_future(d.run("s", [b"wait"]))
    await backend.entered.wait()
    n = 200
    burst = [asyncio.ensure_future(d.run("s", [f"x{i}".encode()])) for i in range(n)]
    await asyncio.sleep(0)  # ok: one step, so every batch of the burst is in line
    roster.looks = 0
    backend.release.set()
    assert await first == [(b"WAIT", None)]
    outs = await asyncio.gather(*burst)
    assert outs == [[(f"X{i}".encode(), None)] for i in range(n)]
    assert backend.actors[0].calls[1:] == [[f"x{i}".encode()] for i in range(n)]  # in order
    print(f"looks at the pool for {n} waiting batches: {roster.looks}")
    assert roster.looks <= 4 * n
    await membership.close()


# -- a hung handler under a session end (issue 23) ------------------------------------


class EndsUnderTheLock(FakeBackend):
    """As on a real actor: a call goes on when its caller gives up, and session
    ends and releases wait for the handler's lock (``PoolActor.end_session`` /
    ``close_sessions``)."""

    async def call(
        self, actor: FakeActor, session_id: str, payloads: list[bytes], shared: object,
        tags: tuple[str, ...],
    ) -> CallResult:  # fmt: skip
        return await asyncio.shield(super().call(actor, session_id, payloads, shared, tags))

    async def end_session(self, actor: FakeActor, session_id: str) -> None:
        async with actor.lock:
            await super().end_session(actor, session_id)

    async def retire(self, actor: FakeActor) -> None:
        async with actor.lock:
            await super().retire(actor)


async def _abandoned_hang(d: Dispatcher[FakeActor], backend: FakeBackend) -> FakeActor:
    """A hanging task whose caller gave up (its stream broke): the actor still
    runs it, holding the lock; returns that actor."""
    call = asyncio.ensure_future(d.run("s", [b"hang"]))
    for _ in range(100):
        await asyncio.sleep(0)  # ok: yields until the call holds the actor's lock
        hung = [a for a in backend.actors if a.lock.locked()]
        if hung:
            break
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    assert hung, "the hanging call never reached an actor"
    return hung[0]


async def test_a_session_end_behind_an_abandoned_hung_task_replaces_the_actor() -> None:
    # The chaos run's stall (seed 104): a hang sent just before its stream broke held
    # the actor's lock; the session's end waited for it for ever, and every later
    # batch of the session waited for the end. Before: this wait_for timed out.
    backend = EndsUnderTheLock()
    _, d = await started(
        backend, num_actors=2, task_timeout_s=5.0, timeout_slack_s=0.05, end_wait_min_s=0.1
    )
    hung = await _abandoned_hang(d, backend)
    await asyncio.wait_for(d.end_session("s"), 5)
    assert hung in backend.killed
    others = [a for a in backend.actors[:2] if a is not hung]
    assert [(a.name, "s") for a in others] == [e for e in backend.ended if e[1] == "s"]


async def test_without_a_task_timeout_a_session_end_waits_for_the_handler() -> None:
    backend = EndsUnderTheLock()
    _, d = await started(backend, num_actors=1, end_wait_min_s=0.01)
    call = asyncio.ensure_future(d.run("s", [b"wait"]))
    await backend.entered.wait()
    end = asyncio.ensure_future(d.end_session("s"))
    await asyncio.sleep(0.05)  # ok: longer than end_wait_min_s, which must not apply
    assert not end.done() and not backend.killed
    backend.release.set()
    await asyncio.wait_for(asyncio.gather(call, end), 5)
    assert backend.ended == [(0, "s")]


async def test_a_released_actor_whose_session_ends_hang_is_killed_anyway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray_alpcrun.pool import membership as membership_module

    monkeypatch.setattr(membership_module, "RETIRE_WAIT_S", 0.1)
    backend = EndsUnderTheLock()
    m, d = await started(backend, num_actors=2, elastic=True, task_timeout_s=5.0)
    hung = await _abandoned_hang(d, backend)
    assert m.release(2) == 2
    for _ in range(100):
        if len(backend.killed) == 2:
            break
        await asyncio.sleep(0.02)  # ok: polls the kill (bounded: 2 s)
    assert hung in backend.killed and len(backend.killed) == 2
