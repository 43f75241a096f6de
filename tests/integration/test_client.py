"""The Python client over real loopback gRPC: local services + one reference worker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from ray_alpcrun import errors
from ray_alpcrun.client import AsyncClient, Client, SubmitTimeout, TaskFailed
from ray_alpcrun.config import DevServerConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.refworker import WorkerThread
from tests.support.refworker_support import assert_exactly_once, connect, mixed, start_worker

UNKNOWN_SESSION = "01J00000000000000000000000"


@pytest.fixture(scope="module")
def services() -> Iterator[LocalServices]:
    with LocalServices(
        DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0)
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def worker(services: LocalServices) -> Iterator[WorkerThread]:
    handle = start_worker(services.service_config(), mixed)
    yield handle
    handle.stop()


@pytest.fixture
def client(services: LocalServices, worker: WorkerThread) -> Iterator[Client]:
    with connect(services) as c:
        yield c


@pytest.fixture(scope="module")
def workerless_client() -> Iterator[Client]:
    """A client of services no worker serves: nothing is ever answered."""
    with LocalServices() as svc, connect(svc) as c:
        yield c


def test_session_life_cycle(client: Client) -> None:
    session = client.create_session(
        app_id="life", priority=7, max_workers=4, idle_timeout_s=30.0, tags=("a", "b")
    )
    assert len(session.id) == 26  # a ULID
    attrs = session.attributes
    assert attrs is not None and attrs.priority == 7 and attrs.max_workers == 4
    assert attrs.tags == ("a", "b") and attrs.idle_timeout_s == 30.0
    session.update(priority=8, max_workers=200)
    attrs = session.attributes
    assert attrs is not None and (attrs.priority, attrs.max_workers) == (8, 200)
    assert attrs.tags == ("a", "b")  # the rest is kept
    with pytest.raises(ValueError, match="priority"):
        session.update(priority=11)
    session.close()
    session.close()  # idempotent
    with pytest.raises(errors.NotFoundError):
        client.session(session.id).update(priority=1)


def test_run_returns_answers_in_input_order_with_task_errors(client: Client) -> None:
    payloads = [b"fail-%d" % i if i % 97 == 0 else b"ok-%d" % i for i in range(1000)]
    with client.create_session(app_id="order") as session:
        results = session.run(payloads, batch_size=64)
    results = assert_exactly_once(results, len(payloads))
    for r, p in zip(results, payloads, strict=True):
        if p.startswith(b"fail"):
            assert not r.ok and r.payload is None and not r.dead
            assert r.error == f"ValueError: asked to fail: {p.decode()}"
            with pytest.raises(TaskFailed):
                r.value()
        else:
            assert r.ok and r.value() == p


def test_map_raises_for_a_failed_task(client: Client) -> None:
    with client.create_session(app_id="map") as session:
        assert session.map([b"a", b"b"]) == [b"a", b"b"]
        with pytest.raises(TaskFailed, match="asked to fail"):
            session.map([b"a", b"fail"])


def test_submit_streams_a_lazy_iterable(client: Client) -> None:
    produced = 0

    def lazy() -> Iterator[bytes]:
        nonlocal produced
        for i in range(3000):
            produced += 1
            yield b"%d" % i

    received = 0
    with client.create_session(app_id="lazy") as session:
        for r in session.submit(lazy(), batch_size=50, max_pending_tasks=250):
            received += 1
            assert r.ok and r.value() == b"%d" % r.index
    assert received == produced == 3000


def test_sending_pauses_at_max_pending_tasks(workerless_client: Client) -> None:
    produced = 0

    def lazy() -> Iterator[bytes]:
        nonlocal produced
        for i in range(3000):
            produced += 1
            yield b"%d" % i

    with (
        workerless_client.create_session(app_id="paused") as session,
        pytest.raises(SubmitTimeout, match="250 of 250 tasks unanswered"),
    ):
        session.run(lazy(), batch_size=50, max_pending_tasks=250, timeout_s=1.0)
    assert produced == 300  # five batches sent, the sixth cut and waiting


def test_shared_data_levels(client: Client, worker: WorkerThread) -> None:
    values = np.arange(1000, dtype="<i8")
    fetches_before = worker.worker.stats.shared_fetches
    with client.create_session(app_id="shared") as session:
        assert session.set_shared_data(values.tobytes(), ttl_s=60.0) == 1
        first = session.map([b"sum:0:10", b"sum:10:1000"], batch_size=1)
        assert first == [str(values[:10].sum()).encode(), str(values[10:].sum()).encode()]
        assert session.set_shared_data((values * 2).tobytes()) == 2
        second = session.map([b"sum:0:10"] * 20, batch_size=5)
        assert second == [str(2 * values[:10].sum()).encode()] * 20
    # One node-cache fetch per (session, level), however many batches used it.
    assert worker.worker.stats.shared_fetches - fetches_before == 2


def test_dead_letters_reach_the_client_once(client: Client) -> None:
    with client.create_session(app_id="dead") as session:
        # Level 9 was never published: the worker cannot set the batch up.
        results = session.run([b"a", b"b", b"c"], batch_size=2, shared_level=9)
        letters = session.dead_letters()
        assert session.dead_letters() == []
    results = assert_exactly_once(results, 3)
    assert all(r.dead and not r.ok and r.error and "level 9" in r.error for r in results)
    assert all(b.dead for b in letters)
    assert sorted(m.id for b in letters for m in b.messages) == sorted(r.task_id for r in results)


def test_concurrent_submissions_share_one_session(client: Client) -> None:
    out: dict[int, list[Any]] = {}
    with client.create_session(app_id="concurrent") as session:

        def one(k: int) -> None:
            out[k] = session.run([b"%d-%d" % (k, i) for i in range(500)], batch_size=20)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k in range(3):
        results = assert_exactly_once(out[k], 500)
        assert [r.value() for r in results] == [b"%d-%d" % (k, i) for i in range(500)]


def test_timeout_when_nothing_is_answered(workerless_client: Client) -> None:
    with (
        workerless_client.create_session(app_id="unserved") as session,
        pytest.raises(SubmitTimeout, match="2 of 2 tasks unanswered"),
    ):
        session.run([b"a", b"b"], timeout_s=0.3)


def test_progress_bar(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    with client.create_session(app_id="progress") as session:
        results = session.run([b"x"] * 300, batch_size=30, progress=True)
    assert len(results) == 300
    assert "300/300" in capsys.readouterr().err


async def test_async_client(services: LocalServices, worker: WorkerThread) -> None:
    async with (
        AsyncClient(
            queue=services.queue_address,
            central_cache=services.central_cache_address,
            api_key=services.api_key,
            proto_package=services.proto_package,
        ) as client,
        await client.create_session(app_id="async") as session,
    ):
        seen = [r.index async for r in session.submit(b"%d" % i for i in range(700))]
        assert sorted(seen) == list(range(700))
        results = await session.run([b"p", b"fail"], batch_size=1)
        assert [r.ok for r in results] == [True, False]


async def test_sync_client_inside_a_running_event_loop(
    services: LocalServices, worker: WorkerThread
) -> None:
    # As in Jupyter: a loop is running in this thread; the blocking client runs
    # its own loop in a background thread, so it neither nests nor deadlocks.
    asyncio.get_running_loop()
    with connect(services) as client, client.create_session(app_id="jupyter") as session:
        assert session.map([b"a", b"b"]) == [b"a", b"b"]


def test_wrong_api_key_is_an_auth_error(services: LocalServices, worker: WorkerThread) -> None:
    with (
        connect(services, api_key="not-the-key") as client,
        pytest.raises(errors.AuthError, match="API key was rejected"),
    ):
        client.create_session(app_id="nope")


def test_missing_api_key_is_an_auth_error(
    services: LocalServices, worker: WorkerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METALCORE_API_KEY", raising=False)
    with (
        connect(services, api_key=None) as client,
        pytest.raises(errors.AuthError, match="no API key was sent"),
    ):
        client.create_session(app_id="nope")


def test_unknown_session_is_not_found(client: Client) -> None:
    session = client.session(UNKNOWN_SESSION)
    with pytest.raises(errors.NotFoundError):
        session.run([b"a"], timeout_s=10)
    # Writing on after the server refused the stream must still say NOT_FOUND.
    with pytest.raises(errors.NotFoundError):
        session.run([b"a"] * 200, batch_size=1, timeout_s=10)
    with pytest.raises(errors.NotFoundError):
        session.update(priority=3)
    with pytest.raises(errors.NotFoundError):
        session.dead_letters()


def test_unreachable_queue_manager() -> None:
    with pytest.raises(errors.UnavailableError, match="cannot reach"):
        Client(queue="127.0.0.1:9", central_cache="127.0.0.1:9", connect_timeout_s=0.3)
