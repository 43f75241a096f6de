"""Session life cycle on the local queue manager, over loopback gRPC with raw stubs."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from ulid import ULID

from ray_alpcrun import errors
from ray_alpcrun.devserver import LocalServices, SessionClosed
from ray_alpcrun.types import Batch, Message, SessionAttributes, SessionInfo
from tests.support.devserver_kit import (
    FakeClock,
    RawClient,
    RawWorker,
    create_session,
    echo,
    md,
    queue_stub,
    tasks,
    wait_for,
)

# ``svc`` (fresh local services on the fake ``clock``, no Ray) and ``channel`` (to its
# queue manager) are fixtures in tests/conftest.py.


async def expect_code(code: grpc.StatusCode, call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def test_create_fills_defaults_and_ulid(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    s = await create_session(svc, channel)
    assert str(ULID.from_str(s.id)) == s.id
    a = s.attributes
    assert a is not None
    assert a.priority == 5
    assert a.idle_timeout_s == 60.0
    assert a.max_inflight_batches_per_worker == 10
    assert a.client_id
    assert a.max_workers is None and a.min_workers is None
    assert s.app_id == "test-app"


async def test_create_keeps_given_attributes(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    s = await create_session(
        svc,
        channel,
        priority=0,
        client_id="me",
        min_workers=1,
        max_workers=4,
        idle_timeout_s=2.5,
        preemptible=True,
        max_inflight_batches_per_worker=3,
        tags=("a", "b"),
    )
    assert s.attributes == SessionAttributes(
        priority=0,
        client_id="me",
        min_workers=1,
        max_workers=4,
        idle_timeout_s=2.5,
        preemptible=True,
        max_inflight_batches_per_worker=3,
        tags=("a", "b"),
    )


@pytest.mark.parametrize(
    "session",
    [
        SessionInfo(app_id=""),
        SessionInfo(app_id="x", attributes=SessionAttributes(priority=11)),
        SessionInfo(app_id="x", attributes=SessionAttributes(max_workers=0)),
        SessionInfo(app_id="x", attributes=SessionAttributes(min_workers=3, max_workers=2)),
    ],
)
async def test_create_validates(
    svc: LocalServices, channel: grpc.aio.Channel, session: SessionInfo
) -> None:
    stub = queue_stub(svc, channel)
    await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, stub.CreateSession(session, metadata=md(svc))
    )


async def test_update_is_partial(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    stub = queue_stub(svc, channel)
    s = await create_session(svc, channel, priority=3, max_workers=10, tags=("x",))
    await stub.UpdateSession(
        SessionInfo(id=s.id, attributes=SessionAttributes(priority=8, max_workers=200)),
        metadata=md(svc),
    )
    a = svc.core.sessions[s.id].attributes
    assert (a.priority, a.max_workers, a.tags, a.client_id) == (
        8,
        200,
        ("x",),
        s.attributes.client_id,
    )  # type: ignore[union-attr]
    await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UpdateSession(
            SessionInfo(id=s.id, attributes=SessionAttributes(priority=12)), metadata=md(svc)
        ),
    )


async def test_close_then_not_found(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    stub = queue_stub(svc, channel)
    s = await create_session(svc, channel)
    await stub.CloseSession(SessionInfo(id=s.id), metadata=md(svc))
    await stub.CloseSession(SessionInfo(id=s.id), metadata=md(svc))  # idempotent
    details = await expect_code(
        grpc.StatusCode.NOT_FOUND, stub.UpdateSession(SessionInfo(id=s.id), metadata=md(svc))
    )
    assert s.id in details
    assert svc.stats()["sessions"] == 0


async def test_unknown_session_everywhere(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    stub = queue_stub(svc, channel)
    unknown = str(ULID())
    for call in (
        stub.UpdateSession(SessionInfo(id=unknown), metadata=md(svc)),
        stub.CloseSession(SessionInfo(id=unknown), metadata=md(svc)),
    ):
        assert unknown in await expect_code(grpc.StatusCode.NOT_FOUND, call)
    dead = stub.ClientStreamDeadLetters(SessionInfo(id=unknown), metadata=md(svc))
    await expect_code(grpc.StatusCode.NOT_FOUND, dead.read())
    client = stub.ClientStream(iter([Batch(session_id=unknown)]), metadata=md(svc))
    await expect_code(grpc.StatusCode.NOT_FOUND, client.read())
    worker = stub.WorkerStream(iter(()), metadata=md(svc, node="n", pod="p", sessionid=unknown))
    await expect_code(grpc.StatusCode.NOT_FOUND, worker.read())
    with pytest.raises(errors.NotFoundError):
        await svc.ajoin(unknown, timeout_s=1)


async def test_client_batch_without_session(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    stub = queue_stub(svc, channel)
    call = stub.ClientStream(iter([Batch(messages=[Message(payload=b"x")])]), metadata=md(svc))
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, call.read())


async def test_worker_stream_needs_binding(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    stub = queue_stub(svc, channel)
    s = await create_session(svc, channel)
    call = stub.WorkerStream(iter(()), metadata=md(svc, node="n", pod="p", sessionid=s.id))
    assert "not bound" in await expect_code(grpc.StatusCode.FAILED_PRECONDITION, call.read())
    call = stub.WorkerStream(iter(()), metadata=md(svc, node="n", pod="p"))
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, call.read())
    update = stub.WorkerUpdate(iter(()), metadata=md(svc))  # no node/pod
    await expect_code(grpc.StatusCode.INVALID_ARGUMENT, update.read())


async def test_idle_session_is_reaped_and_unbinds(
    svc: LocalServices, channel: grpc.aio.Channel, clock: FakeClock
) -> None:
    stub = queue_stub(svc, channel)
    s = await create_session(svc, channel, idle_timeout_s=5.0)
    state = svc.core.sessions[s.id]
    async with RawWorker(svc) as worker:
        async with RawClient(svc) as client:
            for b in tasks(s.id, 2):
                client.send(b)
            assert len(await client.read(2)) == 2
            clock.advance(10.0)
            await svc.atick()
            assert s.id in svc.core.sessions  # an open client stream is activity
        await wait_for(lambda: not state.clients)  # the server saw the client go
        clock.advance(4.0)
        await svc.atick()
        assert s.id in svc.core.sessions
        clock.advance(1.5)
        await svc.atick()
        assert s.id not in svc.core.sessions
        await expect_code(
            grpc.StatusCode.NOT_FOUND, stub.UpdateSession(SessionInfo(id=s.id), metadata=md(svc))
        )
        await svc.ajoin(s.id)  # closed after every task was answered: fine
        await wait_for(lambda: len(worker.instructions) == 2)
        assert [i.type.name for i in worker.instructions] == ["BIND", "UNBIND"]


async def test_cleanup_on_client_exit(svc: LocalServices, channel: grpc.aio.Channel) -> None:
    stub = queue_stub(svc, channel)
    s = await create_session(svc, channel, cleanup_on_client_exit=True)

    async def hold_last(batch: Batch) -> Batch | None:
        # One task stays unanswered, so the session is not drained when the client
        # leaves: its departure cannot be mistaken for the normal end of a drained
        # stream (a cancelling client may half-close first, which is such an end).
        return None if batch.messages[0].id == "t3" else await echo(batch)

    async with RawWorker(svc, answer=hold_last), RawClient(svc) as client:
        for b in tasks(s.id, 4):
            client.send(b)
        assert len(await client.read(3)) == 3
    await wait_for(lambda: s.id not in svc.core.sessions)
    with pytest.raises(SessionClosed, match="1 unanswered"):  # the held task was dropped
        await svc.ajoin(s.id, timeout_s=5)
    await expect_code(
        grpc.StatusCode.NOT_FOUND, stub.UpdateSession(SessionInfo(id=s.id), metadata=md(svc))
    )


async def test_join_reports_closed_with_unanswered(
    svc: LocalServices, channel: grpc.aio.Channel
) -> None:
    stub = queue_stub(svc, channel)
    # Only with cleanup_on_client_exit does CloseSession empty the queues.
    s = await create_session(svc, channel, cleanup_on_client_exit=True)
    async with RawClient(svc) as client:
        client.send(tasks(s.id, 1)[0])
        await wait_for(lambda: svc.stats()["submitted_tasks"] == 1)
        with pytest.raises(TimeoutError, match="1 task"):
            await svc.ajoin(s.id, timeout_s=0.05)
        await stub.CloseSession(SessionInfo(id=s.id), metadata=md(svc))
        with pytest.raises(SessionClosed, match="1 unanswered"):
            await svc.ajoin(s.id)
        assert await client.read_all() == []  # the server ends the stream of a closed session
