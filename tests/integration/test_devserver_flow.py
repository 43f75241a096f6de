"""Tasks through the local queue manager: ordering, priorities, the in-flight
window, worker failures, partial and duplicate answers, dead letters. Every test
that moves tasks checks that each was answered exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc.aio
import pytest
from ulid import ULID

from ray_alpcrun import transport
from ray_alpcrun.devserver import DevServerConfig, LocalServices
from ray_alpcrun.types import Batch, InstructionType, Message, SessionInfo
from tests.support.devserver_kit import (
    FakeClock,
    RawClient,
    RawWorker,
    create_session,
    echo,
    free_config,
    md,
    queue_stub,
    tasks,
    wait_for,
)

# ``svc`` (fresh local services on the fake ``clock``, no Ray) and ``channel`` (to its
# queue manager) are fixtures in tests/conftest.py; ``devserver_config`` below is
# what this module's ``svc`` is started with.


@pytest.fixture
def devserver_config() -> DevServerConfig:
    """A batch is dead-lettered after its second delivery fails."""
    return free_config(max_deliveries=2)


def assert_exactly_once(results: list[Message], n: int) -> None:
    counts = Counter(m.related_id for m in results)
    assert counts == Counter({f"t{i}": 1 for i in range(n)})
    for m in results:
        assert m.payload == (b"t" + m.related_id[1:].encode())[::-1]  # type: ignore[index]


async def hold(batch: Batch) -> None:
    """A worker that never answers."""
    return None


async def test_round_trip_exactly_once(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    s = await create_session(svc, channel)
    async with RawWorker(svc, pod="a"), RawWorker(svc, pod="b"), RawClient(svc) as client:
        for b in tasks(s.id, 500, per_batch=10):
            client.send(b)
        client.half_close()
        batches = await client.read_all()  # the server ends the stream once drained
        assert_exactly_once([m for b in batches for m in b.messages], 500)
        await svc.ajoin(s.id, timeout_s=5)
    stats = svc.stats()
    assert stats["deliveries"] == 50 and stats["redeliveries"] == 0
    assert stats["binds"] == 2
    assert all(str(ULID.from_str(b.id)) == b.id for b in batches)


async def test_worker_stream_matched_by_worker_id(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel)
    # Two registrations from the same node and pod: the worker id tells them apart.
    async with (
        RawWorker(svc, stream_by_id=True) as a,
        RawWorker(svc, stream_by_id=True) as b,
        RawClient(svc) as client,
    ):
        for batch in tasks(s.id, 20):
            client.send(batch)
        assert_exactly_once(await client.read(20), 20)
    assert a.worker_id != b.worker_id
    assert len(a.received) + len(b.received) == 20


async def test_server_assigns_ids(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    s = await create_session(svc, channel)
    async with RawWorker(svc), RawClient(svc) as client:
        client.send(Batch(session_id=s.id, messages=[Message(payload=b"a"), Message(payload=b"b")]))
        results = await client.read(2)
    batch_ids = {m.related_id.rsplit(".", 1)[0] for m in results}  # type: ignore[union-attr]
    assert len(batch_ids) == 1
    batch_id = batch_ids.pop()
    assert str(ULID.from_str(batch_id)) == batch_id
    assert {m.related_id for m in results} == {f"{batch_id}.{i}" for i in range(2)}


async def test_batch_priority_orders_within_session(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel, max_inflight_batches_per_worker=1)
    async with RawClient(svc) as client:
        order = [(0, "a"), (1, "b"), (0, "c"), (1, "d")]
        for priority, name in order:
            client.send(Batch(id=name, session_id=s.id, priority=priority, messages=[Message()]))
        await wait_for(lambda: svc.stats()["submitted_batches"] == 4)
        async with RawWorker(svc) as worker:
            await client.read(4)
    assert [b.id for b in worker.received] == ["b", "d", "a", "c"]


async def test_higher_priority_session_served_first(
    svc: LocalServices, channel: grpc.aio.Channel, clock: FakeClock
) -> None:
    low = await create_session(svc, channel, priority=1)
    high = await create_session(svc, channel, priority=9)
    async with RawClient(svc) as client:
        for b in tasks(low.id, 5) + tasks(high.id, 5):
            client.send(b)
        await wait_for(lambda: svc.stats()["submitted_tasks"] == 10)
        async with RawWorker(svc) as worker:
            await client.read(5)
            assert {b.session_id for b in worker.received} == {high.id}
            clock.advance(2.0)  # the high session is idle: its worker is rebalanced
            await svc.atick()
            await client.read(5)
    assert [b.session_id for b in worker.received] == [high.id] * 5 + [low.id] * 5
    assert [(i.type, i.session_id) for i in worker.instructions] == [
        (InstructionType.BIND, high.id),
        (InstructionType.UNBIND, high.id),
        (InstructionType.BIND, low.id),
    ]


async def test_inflight_window_respected(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    window = 3
    held: list[Batch] = []
    worker: RawWorker

    async def answer_when_window_full(batch: Batch) -> None:
        held.append(batch)
        if len(held) == window:  # more than the window would show in the stats
            for b in held:
                worker.send(await echo(b))
            held.clear()

    s = await create_session(svc, channel, max_inflight_batches_per_worker=window)
    async with RawClient(svc) as client:
        for b in tasks(s.id, 30):
            client.send(b)
        async with RawWorker(svc, answer=answer_when_window_full) as worker:
            assert_exactly_once(await client.read(30), 30)
    assert svc.stats()["max_inflight_seen_per_worker"] == {worker.worker_id: window}


async def test_max_workers_is_a_hard_cap(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    s = await create_session(svc, channel, max_workers=1)
    async with RawClient(svc) as client:
        for b in tasks(s.id, 20):
            client.send(b)
        async with RawWorker(svc, pod="a") as a, RawWorker(svc, pod="b") as b:
            assert_exactly_once(await client.read(20), 20)
            assert sorted([len(a.received), len(b.received)]) == [0, 20]
    assert svc.stats()["binds"] == 1


async def test_killed_worker_batches_redelivered(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel, max_inflight_batches_per_worker=5)
    async with RawClient(svc) as client:
        for b in tasks(s.id, 20):
            client.send(b)
        async with RawWorker(svc, pod="doomed", answer=hold) as doomed:
            await wait_for(lambda: len(doomed.received) == 5)
            await doomed.kill()
            async with RawWorker(svc, pod="healthy") as healthy:
                assert_exactly_once(await client.read(20), 20)
        await svc.ajoin(s.id, timeout_s=5)
    redelivered = {b.messages[0].id for b in doomed.received}
    assert redelivered <= {b.messages[0].id for b in healthy.received}
    assert svc.stats()["redeliveries"] == 5


async def test_broken_worker_stream_requeues_and_unbinds(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    flaky: RawWorker

    async def hold_first_two(batch: Batch) -> Batch | None:
        return None if len(flaky.received) <= 2 else await echo(batch)

    s = await create_session(svc, channel, max_inflight_batches_per_worker=2)
    async with RawClient(svc) as client:
        for b in tasks(s.id, 6):
            client.send(b)
        async with RawWorker(svc, pod="flaky", answer=hold_first_two) as flaky:
            await wait_for(lambda: len(flaky.received) == 2)
            flaky.break_stream()  # its two batches go back to the queue, and it is unbound
            async with RawWorker(svc, pod="ok") as ok:
                assert_exactly_once(await client.read(6), 6)
    assert [i.type for i in flaky.instructions[:2]] == [
        InstructionType.BIND,
        InstructionType.UNBIND,
    ]
    assert len(ok.received) + len(flaky.received) == 8
    assert svc.stats()["redeliveries"] == 2


@pytest.mark.parametrize("end", ["killed", "half-closed"])
async def test_a_batch_of_a_broken_stream_skips_the_streams_of_its_connection(
    svc: LocalServices, channel: grpc.aio.Channel, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    # A killed node bridge breaks its logical workers' streams one after the
    # other; the first one's batch went to the next (dying) one at once, and a
    # lost node later used up the third delivery (the three-node scenario on CI).
    # A process killed by a signal may end its calls as if half-closed.
    from ray_alpcrun.devserver import flow

    monkeypatch.setattr(flow, "LOST_PEER_S", 30.0)  # the test, not the clock, decides
    s = await create_session(svc, channel, max_inflight_batches_per_worker=2)
    # One connection for two logical workers, as a bridge has.
    shared = grpc.aio.insecure_channel(
        svc.queue_address, options=[("grpc.use_local_subchannel_pool", 1)]
    )
    async with RawClient(svc) as client:
        for b in tasks(s.id, 3):
            client.send(b)
        async with (
            RawWorker(svc, pod="a", answer=hold, channel=shared) as a,
            RawWorker(svc, pod="b", answer=hold, channel=shared) as b,
        ):
            await wait_for(lambda: len(a.received) + len(b.received) == 3)
            # The holder's window is full; its sibling has room for one more.
            holder, sibling = (a, b) if len(a.received) == 2 else (b, a)
            if end == "killed":
                await holder.kill()  # its process dies: the sibling's stream would go next
            else:
                holder.send(None)  # type: ignore[arg-type]  # half-closed, batches unanswered
            async with RawWorker(svc, pod="other") as other:  # another connection
                answers = await asyncio.wait_for(client.read(2), 20)
            assert len(sibling.received) == 1 and len(other.received) == 2
    held = {m.id for batch in holder.received for m in batch.messages}
    assert {m.related_id for m in answers} == held
    await shared.close(None)
    assert svc.stats()["redeliveries"] == 2


@pytest.mark.parametrize("kind", ["stream", "registration"])
async def test_a_call_aborted_by_the_queue_manager_ends_unavailable_and_requeues(
    svc: LocalServices, channel: grpc.aio.Channel, kind: str
) -> None:
    # The chaos run's fault hook: the server drops a WorkerStream or a WorkerUpdate.
    doomed: RawWorker

    async def hold_first_two(batch: Batch) -> Batch | None:
        return None if len(doomed.received) <= 2 else await echo(batch)

    s = await create_session(svc, channel, max_inflight_batches_per_worker=2)
    async with RawClient(svc) as client:
        for b in tasks(s.id, 6):
            client.send(b)
        async with RawWorker(svc, pod="doomed", answer=hold_first_two) as doomed:
            await wait_for(lambda: len(doomed.received) == 2)
            call = doomed._stream if kind == "stream" else doomed._update
            assert await svc.aabort(kind, count=5, seed=1) == 1  # the one open
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
            assert "fault injected" in await call.details()
            async with RawWorker(svc, pod="ok") as ok:
                assert_exactly_once(await client.read(6), 6)
    assert len(ok.received) + len(doomed.received) == 8  # the two held ones went again
    assert svc.stats()["redeliveries"] == 2


async def test_first_answer_wins(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    worker: RawWorker

    async def answer_twice(batch: Batch) -> Batch:
        result = await echo(batch)
        worker.send(await echo(batch))  # a duplicate right behind the real answer
        return result

    s = await create_session(svc, channel)
    async with RawClient(svc) as client:
        for b in tasks(s.id, 4):
            client.send(b)
        async with RawWorker(svc, answer=answer_twice) as worker:
            assert_exactly_once(await client.read(4), 4)
            await wait_for(lambda: svc.stats()["dropped_results"] == 4)
            client.half_close()
            assert await client.read_all() == []


async def test_partial_answer_requeues_the_rest(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    seen: set[str] = set()

    async def skip_first_sight(batch: Batch) -> Batch:
        result = await echo(batch)
        fresh = [m for m in result.messages if m.id not in seen]
        seen.update(m.id for m in batch.messages)
        if fresh and len(batch.messages) > 1:
            result.messages = result.messages[1:]  # leave one task unanswered
        return result

    s = await create_session(svc, channel)
    async with RawWorker(svc, answer=skip_first_sight), RawClient(svc) as client:
        client.send(tasks(s.id, 3, per_batch=3)[0])
        assert_exactly_once(await client.read(3), 3)
    stats = svc.stats()
    assert stats["partial_results"] == 1 and stats["deliveries"] == 2


async def test_dead_batch_from_worker(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    async def give_up(batch: Batch) -> Batch:
        first = batch.messages[0]
        return Batch(
            id=batch.id,
            session_id=batch.session_id,
            messages=[Message(id=first.id, error="cannot parse")],
            dead=True,
        )

    s = await create_session(svc, channel)
    async with RawWorker(svc, answer=give_up), RawClient(svc) as client:
        client.send(tasks(s.id, 2, per_batch=2)[0])
        client.half_close()
        assert await client.read_all() == []  # nothing answered as a result
        await svc.ajoin(s.id, timeout_s=5)
    stub = queue_stub(svc, channel)
    dead = [b async for b in stub.ClientStreamDeadLetters(SessionInfo(id=s.id), metadata=md(svc))]
    assert len(dead) == 1 and dead[0].dead is True
    assert [(m.id, m.payload, m.error) for m in dead[0].messages] == [
        ("t0", b"t0", "cannot parse"),
        ("t1", b"t1", "the worker marked the batch dead"),
    ]
    again = [b async for b in stub.ClientStreamDeadLetters(SessionInfo(id=s.id), metadata=md(svc))]
    assert again == []  # reading drains the dead-letter queue


async def test_delivery_exhaustion_dead_letters(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel)
    async with RawClient(svc) as client:
        client.send(tasks(s.id, 1)[0])
        for attempt in range(2):  # max_deliveries=2 in this module's config
            async with RawWorker(svc, pod=f"crash-{attempt}", answer=hold) as crashing:
                await crashing.got_batch.wait()
        await svc.ajoin(s.id, timeout_s=5)
        stub = queue_stub(svc, channel)
        dead = [
            b async for b in stub.ClientStreamDeadLetters(SessionInfo(id=s.id), metadata=md(svc))
        ]
    assert len(dead) == 1
    assert dead[0].messages[0].error == "delivered 2 times without an answer"
    assert svc.stats()["dead_lettered_batches"] == 1


async def test_results_wait_for_a_reconnecting_client(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel)
    state = svc.core.sessions[s.id]
    async with RawClient(svc) as first:
        for b in tasks(s.id, 10):
            first.send(b)
        await wait_for(lambda: state.submitted_tasks == 10)
    await wait_for(lambda: not state.clients)  # the client is gone before any result exists
    async with RawWorker(svc):
        await wait_for(lambda: len(state.results) == 10)  # results wait in the result queue
        async with RawClient(svc, session_id=s.id) as second:
            assert_exactly_once(await second.read(10), 10)
        await svc.ajoin(s.id, timeout_s=5)


async def test_a_result_handed_out_as_the_client_stream_ends_is_kept(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    # A client stream ended by gRPC (e.g. a batch over the limit refused on it)
    # while a result was being written lost that result; its tasks never got an
    # answer. The servicer is driven directly so the end comes exactly there.
    from ray_alpcrun.devserver.queue import QueueServicer

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return ((transport.MD_SESSION_ID, s.id),)

        def cancelled(self) -> bool:
            return True

    async def nothing_sent() -> AsyncIterator[Batch]:
        await asyncio.Event().wait()
        yield Batch()  # pragma: no cover - never reached

    s = await create_session(svc, channel)
    state = svc.core.sessions[s.id]
    async with RawClient(svc) as first:
        for b in tasks(s.id, 3):
            first.send(b)
        await wait_for(lambda: state.submitted_tasks == 3)
    await wait_for(lambda: not state.clients)
    async with RawWorker(svc):
        await wait_for(lambda: len(state.results) == 3)
        stream = QueueServicer(svc.core).ClientStream(nothing_sent(), Context())  # type: ignore[arg-type]
        handed = await stream.__anext__()
        await stream.aclose()  # the call ended before that result was written
        assert state.results[0] is handed and state.handed_tasks == 0
        async with RawClient(svc, session_id=s.id) as second:
            assert_exactly_once(await second.read(3), 3)
        await svc.ajoin(s.id, timeout_s=5)


async def test_preemptible_session_yields_its_worker(
    svc: LocalServices, channel: grpc.aio.Channel, clock: FakeClock
) -> None:
    low = await create_session(svc, channel, priority=1, preemptible=True)
    high = await create_session(svc, channel, priority=9)
    gate = asyncio.Event()

    async def slow_low(batch: Batch) -> Batch:
        if batch.session_id == low.id:
            await gate.wait()
        return await echo(batch)

    async with RawWorker(svc, answer=slow_low) as worker, RawClient(svc) as client:
        for b in tasks(low.id, 50):
            client.send(b)
        await worker.got_batch.wait()
        for b in tasks(high.id, 5):
            client.send(b)
        await wait_for(lambda: svc.stats()["unbinds"] == 1)  # preempted while busy
        gate.set()  # its 10 batches in flight are still answered
        first = await client.read(15)
        assert Counter(m.related_id for m in first) == Counter(
            {f"t{i}": 2 for i in range(5)} | {f"t{i}": 1 for i in range(5, 10)}
        )
        clock.advance(2.0)  # the high session ran dry: its worker goes back to the low one
        await svc.atick()
        rest = await client.read(40)
        assert sorted(m.related_id for m in rest) == sorted(f"t{i}" for i in range(10, 50))
    kinds = [(i.type, i.session_id) for i in worker.instructions]
    assert kinds == [
        (InstructionType.BIND, low.id),
        (InstructionType.UNBIND, low.id),
        (InstructionType.BIND, high.id),
        (InstructionType.UNBIND, high.id),
        (InstructionType.BIND, low.id),
    ]


async def test_worker_that_stops_reporting_is_reused(
    svc: LocalServices, channel: grpc.aio.Channel, clock: FakeClock
) -> None:
    first = await create_session(svc, channel)
    second = await create_session(svc, channel)
    async with RawWorker(svc, report_once=True) as worker, RawClient(svc) as client:
        for b in tasks(first.id, 3):
            client.send(b)
        await client.read(3)
        for b in tasks(second.id, 3):
            client.send(b)
        await wait_for(lambda: svc.stats()["submitted_tasks"] == 6)
        clock.advance(2.0)  # the first session is idle: UNBIND, then the worker counts as idle
        await svc.atick()
        await client.read(3)
    assert [(i.type, i.session_id) for i in worker.instructions] == [
        (InstructionType.BIND, first.id),
        (InstructionType.UNBIND, first.id),
        (InstructionType.BIND, second.id),
    ]


async def test_reused_batch_id_is_answered_twice_under_it(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel)
    async with RawClient(svc) as client:
        for i in range(2):
            client.send(Batch(id="dup", session_id=s.id, messages=[Message(f"t{i}", b"t%d" % i)]))
        await wait_for(lambda: svc.stats()["submitted_tasks"] == 2)
        async with RawWorker(svc) as worker:
            batches = [await client.call.read() for _ in range(2)]
    assert [b.id for b in batches] == ["dup", "dup"]
    assert_exactly_once([m for b in batches for m in b.messages], 2)
    assert len({b.id for b in worker.received}) == 2  # unique ids towards the worker


async def test_repeated_task_ids_rejected(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    s = await create_session(svc, channel)
    async with RawClient(svc) as client:
        client.send(Batch(session_id=s.id, messages=[Message(id="x"), Message(id="x")]))
        assert await client.call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "repeats a task id" in await client.call.details()


async def test_batch_timeout_fails_a_stalled_worker(clock: FakeClock) -> None:
    stalled: RawWorker

    async def stall_first_two(batch: Batch) -> Batch | None:
        return None if len(stalled.received) <= 2 else await echo(batch)

    async with LocalServices(free_config(batch_timeout_s=30.0), clock=clock) as svc:
        channel = transport.open_channel(svc.queue_address)
        try:
            s = await create_session(svc, channel, max_inflight_batches_per_worker=2)
            async with RawClient(svc) as client:
                for b in tasks(s.id, 4):
                    client.send(b)
                async with RawWorker(svc, pod="stalled", answer=stall_first_two) as stalled:
                    await wait_for(lambda: len(stalled.received) == 2)
                    clock.advance(29.0)
                    await svc.atick()
                    assert svc.stats()["redeliveries"] == 0
                    clock.advance(1.0)
                    await svc.atick()  # the stream is failed: batches re-queued, UNBIND
                    assert_exactly_once(await client.read(4), 4)
            assert [i.type for i in stalled.instructions[:2]] == [
                InstructionType.BIND,
                InstructionType.UNBIND,
            ]
            assert svc.stats()["redeliveries"] == 2
        finally:
            await channel.close(None)


@pytest.mark.parametrize("preemptible", [True, False])
async def test_equal_sessions_share_the_workers(
    svc: LocalServices, channel: grpc.aio.Channel, clock: FakeClock, preemptible: bool
) -> None:
    first = await create_session(svc, channel, preemptible=preemptible)
    second = await create_session(svc, channel)
    gate = asyncio.Event()

    async def slow_first(batch: Batch) -> Batch:
        if batch.session_id == first.id:
            await gate.wait()
        return await echo(batch)

    async with (
        RawWorker(svc, pod="a", answer=slow_first) as wa,
        RawWorker(svc, pod="b", answer=slow_first) as wb,
        RawClient(svc) as client,
    ):
        for b in tasks(first.id, 40):
            client.send(b)
        await wait_for(lambda: wa.got_batch.is_set() and wb.got_batch.is_set())
        # Both workers serve the first session; the second arrives with work and
        # no worker: one worker is rebalanced to it while the first still has work.
        for b in tasks(second.id, 5):
            client.send(b)
        await wait_for(lambda: svc.stats()["submitted_tasks"] == 45)
        if not preemptible:
            # Only a preemptible session gives workers up: the first keeps both.
            await svc.atick()
            assert svc.stats()["unbinds"] == 0
            gate.set()
            first_results = await client.read(40)
            assert {m.related_id for m in first_results} == {f"t{i}" for i in range(40)}
            clock.advance(2.0)  # the first session ran dry: its workers go to the second
            await svc.atick()
            assert len(await client.read(5)) == 5
            return
        await wait_for(lambda: svc.stats()["unbinds"] == 1)
        gate.set()  # the rebalanced worker answers what it holds, then moves
        results = await client.read(45)
        assert len(results) == 45
        assert Counter(m.related_id for m in results) == Counter(
            {f"t{i}": 2 for i in range(5)} | {f"t{i}": 1 for i in range(5, 40)}
        )
    served = {
        i.session_id for w in (wa, wb) for i in w.instructions if i.type == InstructionType.BIND
    }
    assert served == {first.id, second.id}


async def test_result_batch_without_id_is_matched_by_related_id(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    # The guide's shared-data example answers with a batch that has no id.
    async def no_batch_id(batch: Batch) -> Batch:
        answer = await echo(batch)
        answer.id = ""
        return answer

    s = await create_session(svc, channel, max_inflight_batches_per_worker=3)
    async with RawWorker(svc, answer=no_batch_id), RawClient(svc) as client:
        for b in tasks(s.id, 12, per_batch=2):
            client.send(b)
        client.half_close()
        results = [m for b in await client.read_all() for m in b.messages]
        await svc.ajoin(s.id, timeout_s=5)
    assert sorted(m.related_id or "" for m in results) == sorted(f"t{i}" for i in range(12))
    assert all(m.payload == (m.related_id or "").encode()[::-1] for m in results)
    assert svc.stats()["dropped_results"] == 0
