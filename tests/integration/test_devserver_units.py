"""The devserver's pure logic without gRPC: task queue order, answer matching,
scheduling choices, attribute rules; and a queue manager restart over gRPC."""

from __future__ import annotations

import time

import grpc
import grpc.aio
import pytest

from ray_alpcrun import transport
from ray_alpcrun.devserver import LocalServices, Rejected, SessionClosed, scheduler
from ray_alpcrun.devserver.attributes import new_attributes, updated_attributes
from ray_alpcrun.devserver.flow import split_answers
from ray_alpcrun.devserver.model import Pending, SessionState, TaskQueue
from ray_alpcrun.types import Batch, Message, SessionAttributes, SessionInfo
from tests.support.devserver_kit import RawClient, RawWorker, create_session, free_config, md, tasks


def pending(batch_id: str, priority: int = 0, n: int = 1) -> Pending:
    return Pending(
        Batch(
            id=batch_id,
            priority=priority,
            messages=[Message(id=f"{batch_id}-{i}") for i in range(n)],
        )
    )


def test_task_queue_priority_then_fifo_and_front() -> None:
    q = TaskQueue()
    for name, priority in [("a", 0), ("b", 2), ("c", 0), ("d", 2), ("e", 1)]:
        q.push(pending(name, priority, n=2))
    assert (q.batches, q.tasks) == (5, 10)
    first = q.pop()
    assert first is not None and first.batch.id == "b"
    q.push_front(first)  # taken back: served next again
    order = []
    while (p := q.pop()) is not None:
        order.append(p.batch.id)
    assert order == ["b", "d", "e", "a", "c"]
    assert (q.batches, q.tasks) == (0, 0)


def test_split_answers() -> None:
    p = pending("x", n=3)
    result = Batch(
        id="x",
        messages=[
            Message(id="x-2", payload=b"2"),  # by id, related_id filled in
            Message(id="r", related_id="x-0", payload=b"0"),  # by related_id
            Message(id="x-2", payload=b"again"),  # repeated: dropped
            Message(id="nope"),  # unknown: dropped
        ],
    )
    answers, rest = split_answers(p, result)
    assert [(m.related_id, m.payload) for m in answers] == [("x-2", b"2"), ("x-0", b"0")]
    assert [t.id for t in rest] == ["x-1"]


def test_split_answers_by_position_without_ids() -> None:
    p = pending("x", n=2)
    answers, rest = split_answers(p, Batch(id="x", messages=[Message(), Message()]))
    assert [(m.id, m.related_id) for m in answers] == [("x-0", "x-0"), ("x-1", "x-1")]
    assert rest == []
    one = pending("y")
    answers, rest = split_answers(one, Batch(id="y", messages=[Message(payload=b"r")]))
    assert [(m.related_id, m.payload) for m in answers] == [("y-0", b"r")] and rest == []


def session(
    sid: str, priority: int, bound: int = 0, queued: int = 0, **attrs: object
) -> SessionState:
    s = SessionState(
        sid, "app", new_attributes(SessionAttributes(priority=priority, **attrs)), 0.0, 0.0
    )  # type: ignore[arg-type]
    for i in range(queued):
        s.tasks.push(pending(f"{sid}{i}"))
    for i in range(bound):
        s.bound[f"w{sid}{i}"] = object()  # type: ignore[assignment]
    return s


def test_best_session_rules() -> None:
    high = session("h", 9, bound=3, queued=9)
    low = session("l", 1, queued=9)
    assert scheduler.best_session([low, high]) is high  # priority first
    a = session("a", 5, bound=2, queued=9)
    b = session("b", 5, bound=1, queued=9)
    assert scheduler.best_session([a, b]) is b  # fewest workers among equals
    hinted = session("m", 5, bound=2, queued=9, min_workers=4)
    assert scheduler.best_session([b, hinted]) is hinted  # below its min_workers hint
    assert scheduler.best_session([]) is None


def test_wants_worker_and_demand() -> None:
    capped = session("c", 5, bound=2, queued=9, max_workers=2)
    assert not capped.wants_worker() and scheduler.demand(capped) == 0
    small = session("s", 5, bound=1, queued=1)
    assert small.wants_worker() is False  # one batch, one worker already
    busy = session("b", 5, bound=1, queued=3)
    assert busy.wants_worker() and scheduler.demand(busy) == 2


def test_preemption_victims() -> None:
    needy = session("n", 8, queued=5)
    donor = session("d", 2, bound=3, preemptible=True)
    keeper = session("k", 1, bound=3)  # not preemptible
    equal = session("e", 8, bound=3, preemptible=True)  # not lower
    victims = scheduler.preemption_victims(needy, [donor, keeper, equal], 2)
    assert len(victims) == 2 and all(v in donor.bound.values() for v in victims)


def test_attribute_rules() -> None:
    with pytest.raises(Rejected):
        new_attributes(SessionAttributes(priority=11))
    a = new_attributes(SessionAttributes(priority=3, tags=("t",)))
    b = updated_attributes(a, SessionAttributes(priority=0, max_workers=5, preemptible=True))
    assert (b.priority, b.max_workers, b.preemptible, b.tags) == (3, 5, True, ("t",))
    assert updated_attributes(a, None) is a


async def test_queue_manager_restart_keeps_port_and_forgets() -> None:
    async with LocalServices(free_config()) as svc:
        address = svc.queue_address
        channel = transport.open_channel(address)
        try:
            old = await create_session(svc, channel)
            await svc.arestart()
            assert svc.queue_address == address
            stub = transport.Stub(channel, "Queue", svc.proto_package)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.UpdateSession(SessionInfo(id=old.id), metadata=md(svc))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            new = await create_session(svc, channel)
            async with RawWorker(svc), RawClient(svc) as client:
                for b in tasks(new.id, 3):
                    client.send(b)
                assert len(await client.read(3)) == 3
        finally:
            await channel.close(None)


def test_sync_form_in_a_background_thread() -> None:
    with LocalServices(free_config()) as svc:
        meta = md(svc)
        with transport.open_sync_channel(svc.queue_address) as channel:
            stub = transport.Stub(channel, "Queue", svc.proto_package)
            s = stub.CreateSession(SessionInfo(app_id="sync"), metadata=meta)
            call = stub.ClientStream(iter(tasks(s.id, 2)), metadata=meta)
            deadline = time.monotonic() + 10
            while svc.stats()["submitted_tasks"] < 2 and time.monotonic() < deadline:
                time.sleep(0.005)  # ok: polling a server-side counter
            with pytest.raises(TimeoutError, match="2 task"):
                svc.join(s.id, timeout_s=0.2)  # no worker: nothing gets answered
            svc.tick()
            stub.CloseSession(SessionInfo(id=s.id), metadata=meta)
            # Without cleanup_on_client_exit nothing submitted is lost: the queued
            # tasks became dead letters, so the session is drained.
            svc.join(s.id)
            assert list(call) == []  # the server ended the stream of the closed session
            dead = list(stub.ClientStreamDeadLetters(SessionInfo(id=s.id), metadata=meta))
            assert sorted(m.id for b in dead for m in b.messages) == ["t0", "t1"]
            assert all(
                b.dead and "closed before it ran" in (b.messages[0].error or "") for b in dead
            )
            # With it, CloseSession empties the queues: the tasks are gone unanswered.
            attrs = SessionAttributes(cleanup_on_client_exit=True)
            c = stub.CreateSession(SessionInfo(app_id="sync", attributes=attrs), metadata=meta)
            call = stub.ClientStream(iter(tasks(c.id, 2)), metadata=meta)
            while svc.stats()["submitted_tasks"] < 4 and time.monotonic() < deadline:
                time.sleep(0.005)  # ok: polling a server-side counter
            stub.CloseSession(SessionInfo(id=c.id), metadata=meta)
            with pytest.raises(SessionClosed, match="2 unanswered"):
                svc.join(c.id)
            assert list(call) == []
    with pytest.raises(RuntimeError):
        svc.join(s.id)  # stopped
