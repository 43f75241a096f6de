"""The probe endpoint (aiohttp) and the bridge's metrics registry (prometheus_client),
without Ray: bad input never stops the endpoint from answering the next probe."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ray_alpcrun.bridge.stats import BridgeMetrics, BridgeStats
from ray_alpcrun.health import MAX_FIELD_BYTES, MAX_LINE_BYTES, HealthServer

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
    values = {name: v for _, name, _, v in ma.values()}
    assert values["alpcrun_tasks_processed_total"] == 7.0
    assert values["alpcrun_pool_actors_alive"] == 3.0
