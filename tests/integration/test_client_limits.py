"""What the client promises when things go wrong: the user's exception wins over
a failing close, data over the message limit fails only itself with a message
naming the limit, and a slow consumer bounds the client's memory."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ray_alpcrun import errors
from ray_alpcrun.client import AsyncClient
from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.refworker import WorkerThread
from tests.support.refworker_support import assert_exactly_once, connect, mixed, start_worker

pytestmark = pytest.mark.timeout(60)

LIMIT = 256 * 1024  # the client's max_message_bytes in these tests


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
