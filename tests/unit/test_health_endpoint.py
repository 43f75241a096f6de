"""The probe endpoint (aiohttp) and the bridge's metrics registry (prometheus_client),
without Ray: bad input never stops the endpoint from answering the next probe, and
a flood of requests costs the pool's actors one round of calls at most."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from ray_alpcrun.bridge.actor import Bridge
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import BridgeMetrics, BridgeStats
from ray_alpcrun.config import PoolConfig
from ray_alpcrun.health import MAX_FIELD_BYTES, MAX_LINE_BYTES, HealthServer
from ray_alpcrun.pool.dispatch import Dispatcher
from ray_alpcrun.pool.membership import Membership
from tests.support.fake_backend import FakeActor, FakeBackend

pytestmark = pytest.mark.timeout(30)


async def ok() -> tuple[bool, str]:
    return True, "serving"


async def not_ready() -> tuple[bool, str]:
    return False, "starting"


async def broken() -> dict[str, Any]:
    return {"ready": False, "slots": [{"worker_id": "w-1"}]}


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    stats = BridgeStats()
    metrics = BridgeMetrics(lambda: stats)

    async def render() -> str:
        return metrics.render()

    srv = HealthServer(ok, not_ready, render, broken, host="127.0.0.1", port=0)
    await srv.start()
    yield srv
    await srv.stop()


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    data = await exchange(
        port, f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_routes(server: HealthServer) -> None:
    assert await get(server.port, "/healthz") == (200, b"ok: serving\n")
    assert await get(server.port, "/readyz") == (503, b"not ok: starting\n")
    code, body = await get(server.port, "/status")
    assert code == 200 and json.loads(body)["slots"][0]["worker_id"] == "w-1"
    code, body = await get(server.port, "/metrics")
    assert code == 200 and b"alpcrun_tasks_processed_total 0.0" in body
    assert (await get(server.port, "/nope"))[0] == 404
    assert (await get(server.port, "/healthz", method="POST"))[0] == 405
    assert (await get(server.port, "/healthz?verbose=1"))[0] == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /healthz HTTP/9.9 extra words\r\n\r\n",
        b"GET /" + b"a" * (MAX_LINE_BYTES + 10) + b" HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * (MAX_FIELD_BYTES + 10) + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n",
    ],
    ids=["binary", "no-path", "bad-version", "huge-line", "huge-header", "many-headers"],
)
async def test_bad_requests_are_refused_and_the_next_probe_answers(
    server: HealthServer, raw: bytes
) -> None:
    answer = await exchange(server.port, raw)
    assert answer == b"" or (answer.startswith(b"HTTP/1.") and b" 200 " not in answer[:16])
    assert (await get(server.port, "/healthz"))[0] == 200


async def test_slow_clients_do_not_block_probes(server: HealthServer) -> None:
    # Twenty clients send half a request line and stall; probes still answer.
    stalled = []
    for _ in range(20):
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /hea")
        await writer.drain()
        stalled.append(writer)
    try:
        assert (await get(server.port, "/healthz"))[0] == 200
        assert (await get(server.port, "/metrics"))[0] == 200
    finally:
        for writer in stalled:
            writer.close()


async def test_port_in_use_raises_oserror(server: HealthServer) -> None:
    other = HealthServer(ok, ok, broken, broken, host="127.0.0.1", port=server.port)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        await other.start()


def test_registry_per_bridge_with_a_real_histogram() -> None:
    a, b = BridgeStats(), BridgeStats()
    ma, mb = BridgeMetrics(lambda: a), BridgeMetrics(lambda: b)
    a.tasks_ok = 7
    a.latency.observe(0.02)
    a.latency.observe(3.0)
    alive = 3
    ma.gauge("alpcrun_pool_actors_alive", "actors alive", lambda: float(alive))
    ma.labelled_gauge("alpcrun_gpu_memory_used_bytes", "GPU memory", "actor", lambda: [("0", 5.0)])
    text = ma.render()
    assert "alpcrun_tasks_processed_total 7.0" in text
    assert 'alpcrun_batch_latency_seconds_bucket{le="0.025"} 1.0' in text
    assert 'alpcrun_batch_latency_seconds_bucket{le="+Inf"} 2.0' in text
    assert "alpcrun_batch_latency_seconds_count 2.0" in text
    assert "alpcrun_pool_actors_alive 3.0" in text
    assert 'alpcrun_gpu_memory_used_bytes{actor="0"} 5.0' in text
    other = mb.render()
    assert "alpcrun_tasks_processed_total 0.0" in other
    assert "alpcrun_batch_latency_seconds_count 0.0" in other
    assert "alpcrun_pool_actors_alive" not in other
    values = {name: v for _, name, _, _, v in ma.values()}
    assert values["alpcrun_tasks_processed_total"] == 7.0
    assert values["alpcrun_pool_actors_alive"] == 3.0


# -- a flood of /status and /metrics costs the actors nothing more (issue 18, item 8) ---


class CountingStatus(FakeBackend):
    """A fake backend that answers status calls and counts them; while ``broken``,
    actor starts fail."""

    def __init__(self) -> None:
        super().__init__()
        self.status_calls = 0
        self.broken = False

    async def start_actor(self) -> FakeActor:
        if self.broken:
            raise RuntimeError("ModuleNotFoundError: No module named 'handlers'")
        return await super().start_actor()

    async def status(self, actor: FakeActor, timeout_s: float) -> dict[str, object]:
        self.status_calls += 1
        await asyncio.sleep(0)  # ok: a reply takes a turn of the loop, as Ray's does
        return {"pid": actor.name, "device": {"memory_used_bytes": 7}}

    async def close(self) -> None:
        return None


@pytest.fixture
def quiet_logging() -> Iterator[None]:
    """A Bridge configures the package's logger; give pytest's back afterwards."""
    logger = logging.getLogger("ray_alpcrun")
    saved = (list(logger.handlers), logger.level, logger.propagate, logging.lastResort)
    yield
    logger.handlers[:], logger.level, logger.propagate, logging.lastResort = saved


async def bridge_on_fake_pool(
    backend: CountingStatus, gpus: float = 0.0, grace_s: float = 60.0
) -> Bridge:
    from ray_alpcrun.pool.actor_pool import ActorPool

    config = PoolConfig(num_actors=2, gpus_per_actor=gpus)
    membership: Membership[FakeActor] = Membership(
        backend, num_actors=2, no_actor_grace_s=grace_s, restart_backoff_s=0.001
    )
    await membership.start()
    pool = ActorPool("tests.support.handlers:echo", config)
    pool._attach(backend, membership, Dispatcher(membership, backend))  # type: ignore[arg-type]
    settings = WorkerSettings("127.0.0.1:1", "127.0.0.1:2", "k", "ghpc.v1", "n", "p", 1)
    bridge = Bridge("tests.support.handlers:echo", config, settings)
    bridge.pool = pool
    # Longer than the test, so that "one round" cannot depend on how fast it runs.
    bridge.status_max_age_s = 600.0
    return bridge


async def flood(bridge: Bridge, paths: list[str]) -> list[tuple[int, bytes]]:
    srv = HealthServer(
        bridge._live, bridge._ready, bridge.metrics_text, bridge.status, "127.0.0.1", 0
    )
    port = await srv.start()
    try:
        return await asyncio.gather(*(get(port, path) for path in paths))
    finally:
        await srv.stop()


@pytest.mark.usefixtures("quiet_logging")
async def test_a_flood_of_status_requests_makes_one_round_of_actor_calls() -> None:
    backend = CountingStatus()
    bridge = await bridge_on_fake_pool(backend, gpus=0.5)
    answers = await flood(bridge, ["/status"] * 100 + ["/metrics"] * 20)
    assert {code for code, _ in answers} == {200}
    status = json.loads(answers[0][1])
    assert [a["pid"] for a in status["actors"]["actors"]] == [0, 1]
    assert status["pool"]["state"] == "serving"
    assert b'alpcrun_gpu_memory_used_bytes{actor="0"} 7.0' in answers[-1][1]
    assert backend.status_calls == 2  # one call per actor, once


@pytest.mark.usefixtures("quiet_logging")
async def test_metrics_of_a_cpu_pool_make_no_actor_call() -> None:
    backend = CountingStatus()
    bridge = await bridge_on_fake_pool(backend, gpus=0.0)
    answers = await flood(bridge, ["/metrics"] * 50)
    assert {code for code, _ in answers} == {200}
    assert backend.status_calls == 0


async def test_a_status_call_that_times_out_is_cancelled() -> None:
    from ray_alpcrun.pool.backend import RayBackend

    backend = RayBackend(cast(Any, None), b"", PoolConfig())
    cancelled: list[object] = []
    backend._ray = SimpleNamespace(cancel=cancelled.append)
    never: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
    actor = SimpleNamespace(status=SimpleNamespace(remote=lambda: never))
    info = await backend.status(cast(Any, actor), 0.01)
    assert info == {"error": "no answer within 0.01 s"}
    # Left queued, it would hold up the actor's next control call (a replacement's ready).
    assert cancelled == [never]


# -- readiness, defined once (issue 18, item 1) ------------------------------------------


class FakeWorker:
    """The gRPC side as the bridge's readiness and pool follower see it."""

    def __init__(self) -> None:
        self.slots = [SimpleNamespace(registered=asyncio.Event())]
        self.paused: str | None = None
        self.pauses: list[str] = []
        self.cache_unreachable: str | None = None

    def pause(self, reason: str) -> None:
        self.paused = reason
        self.pauses.append(reason)

    def resume(self) -> None:
        self.paused = None


@pytest.mark.usefixtures("quiet_logging")
async def test_ready_exactly_while_the_bridge_takes_work() -> None:
    backend = CountingStatus()
    bridge = await bridge_on_fake_pool(backend, grace_s=0.05)
    assert bridge.pool is not None
    worker = FakeWorker()
    bridge.worker = cast(Any, worker)
    bridge.pool.watch(bridge._on_pool)
    assert await bridge._ready() == (False, "not registered with the queue manager")
    worker.slots[0].registered.set()
    assert await bridge._ready() == (True, "2 actor(s) (0 pending), 1 slot(s) registered")

    # Both actors lost while no replacement can start: batches wait, still ready...
    backend.broken = True
    membership = cast(Any, bridge.pool)._membership
    for member in membership.members():
        membership.lost(member, "killed")
    ok, why = await bridge._ready()
    assert ok and "0 actors, waiting: no live actor" in why
    # ...until the grace runs out: not ready, with the reason, and work stops.
    unavailable = asyncio.Event()
    bridge.pool.watch(lambda a: a.state == "unavailable" and unavailable.set())  # type: ignore[func-returns-value]
    await unavailable.wait()
    ok, why = await bridge._ready()
    assert not ok and why.startswith("no live actor for") and "No module named" in why
    assert len(worker.pauses) == 1 and worker.pauses[0].startswith("no live actor for")
    bridge.worker = None  # /status reads much more of a real worker
    status = await bridge.status()
    bridge.worker = cast(Any, worker)
    assert status["pool"]["state"] == "unavailable"
    assert status["pool"]["reason"].startswith("no live actor for")
    assert status["pool"]["last_start_error"].endswith("No module named 'handlers'")

    # The first live actor: work is taken again.
    backend.broken = False
    await membership.settle()
    assert worker.paused is None
    assert (await bridge._ready())[0]

    # A node cache it cannot reach: not ready, naming it (issue 20, item 2).
    worker.cache_unreachable = "node cache at 127.0.0.1:2 unreachable (UNAVAILABLE: ...)"
    assert await bridge._ready() == (False, worker.cache_unreachable)
    worker.cache_unreachable = None
    # Later reasons plug in; draining comes first.
    bridge.add_readiness_check(lambda: "another reason")
    assert await bridge._ready() == (False, "another reason")
    bridge.draining = True
    assert await bridge._ready() == (False, "draining")
    await membership.close()
