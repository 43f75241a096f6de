"""Central and node cache: update levels, TTL expiry on a fake clock, read-through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from ray_alpcrun import transport
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.types import SharedData
from tests.support.devserver_kit import FakeClock, md

# ``svc`` (fresh local services on the fake ``clock``, no Ray) is a fixture in
# tests/conftest.py.


class Caches:
    def __init__(self, svc: LocalServices) -> None:
        self.svc = svc
        self._channels = [
            transport.open_channel(svc.central_cache_address),
            transport.open_channel(svc.node_cache_address),
        ]
        self.central = transport.Stub(self._channels[0], "Cache", svc.proto_package)
        self.node = transport.Stub(self._channels[1], "Cache", svc.proto_package)

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close(None)

    async def set(self, stub: Any, item: SharedData) -> None:
        await stub.SetSharedData(item, metadata=md(self.svc))

    async def get(self, stub: Any, session_id: str, level: int | None = None) -> SharedData:
        reply: SharedData = await stub.GetSharedData(
            SharedData(session_id, level), metadata=md(self.svc)
        )
        return reply


@pytest.fixture
async def caches(svc: LocalServices) -> AsyncIterator[Caches]:
    c = Caches(svc)
    yield c
    await c.close()


async def not_found(call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    return info.value.details() or ""


async def test_levels(caches: Caches) -> None:
    c = caches
    await c.set(c.central, SharedData("s", 1, b"one"))
    await c.set(c.central, SharedData("s", 2, b"two"))
    assert (await c.get(c.central, "s", 1)).payload == b"one"
    latest = await c.get(c.central, "s")
    assert (latest.update_level, latest.payload, latest.ttl_s) == (2, b"two", None)
    details = await not_found(c.get(c.central, "s", 3))
    assert details == "no shared data at level 3 for session s (have: 1, 2)"
    assert "other" in await not_found(c.get(c.central, "other"))


async def test_unset_level_takes_the_next_one(caches: Caches) -> None:
    c = caches
    await c.set(c.central, SharedData("s", None, b"first"))
    await c.set(c.central, SharedData("s", None, b"second"))
    assert (await c.get(c.central, "s", 2)).payload == b"second"
    assert (await c.get(c.central, "s")).update_level == 2


async def test_ttl_expiry(caches: Caches, clock: FakeClock) -> None:
    c = caches
    await c.set(c.central, SharedData("s", 1, b"old", ttl_s=10.0))
    await c.set(c.central, SharedData("s", 2, b"new", ttl_s=100.0))
    got = await c.get(c.central, "s", 1)
    assert got.ttl_s == pytest.approx(10.0)
    clock.advance(10.0)
    assert "expired" in await not_found(c.get(c.central, "s", 1))
    assert (await c.get(c.central, "s")).update_level == 2  # latest live level
    clock.advance(90.0)
    assert "expired" in await not_found(c.get(c.central, "s"))


async def test_session_id_required(caches: Caches) -> None:
    for stub in (caches.central, caches.node):
        for call in (
            stub.SetSharedData(SharedData("", 1, b"x"), metadata=md(caches.svc)),
            stub.GetSharedData(SharedData("", 1), metadata=md(caches.svc)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_node_cache_reads_through_once(caches: Caches, svc: LocalServices) -> None:
    c = caches
    await c.set(c.central, SharedData("s", 1, b"weights" * 1000, ttl_s=600.0))
    replies = await asyncio.gather(*(c.get(c.node, "s", 1) for _ in range(5)))
    replies.append(await c.get(c.node, "s", 1))
    assert {r.payload for r in replies} == {b"weights" * 1000}
    stats = svc.stats()
    assert stats["get_shared_data_calls"] == 6
    assert stats["central_get_calls"] == 1


async def test_node_cache_honours_ttl_and_errors(
    caches: Caches, svc: LocalServices, clock: FakeClock
) -> None:
    c = caches
    await c.set(c.central, SharedData("s", 1, b"x", ttl_s=5.0))
    assert (await c.get(c.node, "s", 1)).payload == b"x"
    clock.advance(5.0)
    assert "expired" in await not_found(c.get(c.node, "s", 1))
    details = await not_found(c.get(c.node, "s", 7))
    assert "no shared data at level 7 for session s" in details


async def test_node_cache_writes_through(caches: Caches, svc: LocalServices) -> None:
    c = caches
    await c.set(c.node, SharedData("s", 4, b"via node"))
    assert (await c.get(c.central, "s", 4)).payload == b"via node"
    assert (await c.get(c.node, "s", 4)).payload == b"via node"
    assert svc.stats()["central_get_calls"] == 1  # the node kept its own copy


async def test_node_cache_without_level_asks_central(caches: Caches, svc: LocalServices) -> None:
    c = caches
    await c.set(c.central, SharedData("s", 1, b"a"))
    assert (await c.get(c.node, "s")).update_level == 1
    await c.set(c.central, SharedData("s", 2, b"b"))
    latest = await c.get(c.node, "s")
    assert (latest.update_level, latest.payload) == (2, b"b")
    assert (await c.get(c.node, "s", 2)).payload == b"b"  # kept from the last answer
    assert svc.stats()["central_get_calls"] == 2
