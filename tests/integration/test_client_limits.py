"""What the client promises when things go wrong: the user's exception wins over
a failing close, data over the message limit fails only itself with a message
naming the limit (the client's, or the queue manager's when it is lower), every
message fits the limit however many tasks a batch holds and however large their
answers and errors, and a slow consumer bounds the client's memory."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ray_alpcrun import errors
from ray_alpcrun.answers import REASON_KEEP_CHARS
from ray_alpcrun.client import AsyncClient
from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.refworker import WorkerThread
from tests.support.bridge_handlers import LONG_REASON, LongStartError, oversized
from tests.support.refworker_support import assert_exactly_once, connect, mixed, start_worker

pytestmark = pytest.mark.timeout(60)

LIMIT = 256 * 1024  # the client's max_message_bytes in these tests
MiB = 1 << 20
SERVICES_LIMIT = 4 * MiB  # the services' default max_message_bytes


@pytest.fixture(scope="module")
def services() -> Iterator[LocalServices]:
    with LocalServices(DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)) as s:
        yield s


@pytest.fixture(scope="module")
def worker(services: LocalServices) -> Iterator[WorkerThread]:
    handle = start_worker(services.service_config(), mixed)
    yield handle
    handle.stop()


async def failing_close() -> None:
    raise errors.UnavailableError("UNAVAILABLE", "the queue manager went away")


def test_the_with_blocks_exception_is_not_replaced_by_a_close_failure(
    services: LocalServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    with connect(services) as client:
        with pytest.raises(KeyError) as caught:  # noqa: SIM117 - the inner block is the subject
            with client.create_session(app_id="mine") as session:
                monkeypatch.setattr(session._async, "close", failing_close)
                raise KeyError("the user's own")
        assert caught.value.args == ("the user's own",)
        notes = getattr(caught.value, "__notes__", [])
        assert any("closing failed" in n and "went away" in n for n in notes)
        # Without an exception in the block, the close failure is the error.
        with pytest.raises(errors.UnavailableError):  # noqa: SIM117
            with client.create_session(app_id="mine") as session:
                monkeypatch.setattr(session._async, "close", failing_close)


async def test_async_with_keeps_the_users_exception(
    services: LocalServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncClient(
        services.queue_address, services.central_cache_address, services.api_key,
        services.proto_package,
    ) as client:  # fmt: skip
        with pytest.raises(ZeroDivisionError):
            async with await client.create_session(app_id="mine") as session:
                monkeypatch.setattr(session, "close", failing_close)
                _ = 1 / 0


def test_a_payload_over_the_limit_fails_only_its_task(
    services: LocalServices, worker: WorkerThread
) -> None:
    with connect(services, max_message_bytes=LIMIT) as client:
        session = client.create_session(app_id="big")
        payloads = [b"ok-%d" % i for i in range(20)]
        payloads[7] = b"x" * (LIMIT + 1)
        results = assert_exactly_once(session.run(payloads, batch_size=4, timeout_s=30), 20)
        big = results[7]
        assert not big.ok and big.error is not None
        assert f"max_message_bytes={LIMIT}" in big.error
        assert "Client(max_message_bytes=...)" in big.error
        assert [r.value() for i, r in enumerate(results) if i != 7] == [
            p for i, p in enumerate(payloads) if i != 7
        ]
        with pytest.raises(errors.PayloadTooLarge, match=r"Client\(max_message_bytes=\.\.\.\)"):
            session.set_shared_data(b"s" * (LIMIT + 1))
        assert session.shared_level is None  # nothing was published
        session.set_shared_data(b"small")  # the session is still usable
        session.close()


def test_answers_not_taken_count_against_max_pending_tasks(
    services: LocalServices, worker: WorkerThread
) -> None:
    max_pending, batch, total = 60, 10, 2000
    pulled = 0

    def lazy() -> Iterator[bytes]:
        nonlocal pulled
        for i in range(total):
            pulled += 1
            yield b"t%d" % i

    with connect(services) as client:
        session = client.create_session(app_id="slow-consumer")
        before = services.stats()["submitted_tasks"]
        before_results = services.stats()["result_tasks"]
        results = session.submit(lazy(), batch_size=batch, max_pending_tasks=max_pending)
        first = next(results)  # the consumer takes one answer, then stalls
        # Wait until every task sent so far is answered and handed to the client:
        # the sender could go on now only if answers waiting to be taken were free.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = services.stats()
            sent = stats["submitted_tasks"] - before
            if sent >= max_pending and stats["result_tasks"] - before_results >= sent:
                break
            time.sleep(0.01)  # ok: polling server-side counters
        sent = services.stats()["submitted_tasks"] - before
        # Held: max_pending, plus the chunk the consumer took and the one in hand-over.
        assert max_pending <= sent <= max_pending + 2 * batch
        assert pulled <= max_pending + 3 * batch
        rest = list(results)  # consuming releases the sender
        assert len(rest) + 1 == total and first.ok
        session.close()


def test_a_dead_batch_of_10000_tasks_carries_the_handlers_reason() -> None:
    # Issue 18.2 (a): the dead batch copied the reason onto 10,000 messages (5.1 MB),
    # its write failed, and the client saw "delivered 3 times without an answer".
    with LocalServices(DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)) as s:
        worker = start_worker(s.service_config(), LongStartError)
        try:
            with connect(s) as client:
                session = client.create_session(app_id="setup-fails")
                [one] = session.run([b"first"], timeout_s=30)
                reason = one.error or ""
                assert one.dead and LONG_REASON in reason and len(reason) > REASON_KEEP_CHARS
                n = 10_000
                results = session.run([b"%d" % i for i in range(n)], batch_size=n, timeout_s=60)
                for r in assert_exactly_once(results, n):
                    assert r.dead and r.error is not None
                    assert r.error.startswith(reason[:REASON_KEEP_CHARS])
                assert s.stats()["redeliveries"] == 0  # answered on the first delivery
                session.close()
        finally:
            worker.stop()


@pytest.mark.parametrize("big", [b"big-answer", b"big-error"])
def test_one_huge_answer_or_error_fails_only_its_task(big: bytes) -> None:
    # Issue 18.2 (b): the text replacing a result was not counted, so one 4.2 MB
    # error turned all 2,000 answers of its batch into "result too large".
    with LocalServices(DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)) as s:
        worker = start_worker(s.service_config(), oversized)
        try:
            with connect(s) as client:
                session = client.create_session(app_id="huge")
                payloads = [b"%04d" % i + b"." * 1020 for i in range(2000)]
                payloads[1234] = big
                results = session.run(payloads, batch_size=2000, timeout_s=60)
                results = assert_exactly_once(results, 2000)
                assert [r.index for r in results if not r.ok] == [1234]
                error = results[1234].error or ""
                if big == b"big-answer":
                    assert "result too large: 4200000 bytes" in error
                else:
                    assert error.startswith("ValueError: " + "e" * 100) and len(error) < 1000
                assert all(r.value() == payloads[r.index] for r in results if r.index != 1234)
                assert s.stats()["submitted_batches"] == 1
                session.close()
        finally:
            worker.stop()


def test_one_client_batch_of_150000_small_tasks_is_answered(
    services: LocalServices, worker: WorkerThread
) -> None:
    # Issue 18.2 (c): batching counted payload bytes only; 150,000 tasks of 8 bytes
    # made a 12 MB message and the stream broke (RESOURCE_EXHAUSTED).
    n = 150_000
    with connect(services) as client:
        session = client.create_session(app_id="many")
        payloads = [i.to_bytes(8, "little") for i in range(n)]
        results = assert_exactly_once(session.run(payloads, batch_size=n, timeout_s=120), n)
        assert all(r.value() == payloads[r.index] for r in results)
        assert services.stats()["submitted_batches"] > 1  # batch_size is an upper bound
        session.close()


def test_a_task_the_queue_manager_refuses_fails_alone(
    services: LocalServices, worker: WorkerThread
) -> None:
    # Issue 20.7: with Client(max_message_bytes=16 MiB) against a 4 MiB queue manager,
    # one 5 MiB task made the whole run raise RESOURCE_EXHAUSTED.
    with connect(services, max_message_bytes=16 * MiB) as client:
        session = client.create_session(app_id="refused")
        n = 40
        payloads = [b"ok-%d" % i for i in range(n)]
        payloads[9] = b"x" * (5 * MiB)
        payloads[30] = b"y" * (5 * MiB)  # after the refusal: cut by the client itself
        before = services.stats()["submitted_tasks"]
        results = assert_exactly_once(session.run(payloads, batch_size=4, timeout_s=60), n)
        assert [r.index for r in results if not r.ok] == [9, 30]
        for i in (9, 30):
            error = results[i].error or ""
            assert f"message limit of {SERVICES_LIMIT} bytes" in error
            assert "Client(max_message_bytes=" in error
        assert all(r.value() == payloads[r.index] for r in results if r.index not in (9, 30))
        # Every other task reached the queue manager exactly once.
        assert services.stats()["submitted_tasks"] - before == n - 2
        again = session.run([b"after"], timeout_s=30)  # the session goes on
        assert again[0].value() == b"after"
        session.close()


def test_batches_over_4_mib_go_through_when_the_queue_manager_takes_them() -> None:
    # The other side of the refusal above: services raised to 16 MiB too. Batches
    # over gRPC's default travel on their own stream and are answered like the rest.
    limit = 16 * MiB
    config = DevServerConfig(
        queue_port=0, central_cache_port=0, node_cache_port=0, max_message_bytes=limit
    )
    with LocalServices(config) as s:
        worker = start_worker(s.service_config(), mixed)
        try:
            with connect(s, max_message_bytes=limit) as client:
                session = client.create_session(app_id="raised")
                payloads = [b"ok-%d" % i for i in range(30)]
                for i in (3, 4, 17):
                    payloads[i] = bytes([i]) * (5 * MiB + i)
                results = assert_exactly_once(session.run(payloads, batch_size=2, timeout_s=60), 30)
                assert all(r.value() == payloads[r.index] for r in results)
                assert s.stats()["submitted_tasks"] == 30
                session.close()
        finally:
            worker.stop()
