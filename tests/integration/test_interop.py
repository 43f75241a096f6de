"""Interop units (issue 10; the slot sequences are in ``test_slot.py``): the
shared-data cache and runtime rules, the bridge's reconnect count and
preflight against a plain-grpcio queue manager, and the devserver's keepalive
policy. No Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest

from ray_alpcrun import errors
from ray_alpcrun._proto import ghpc_pb2 as pb
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.worker import BridgeWorker
from ray_alpcrun.handler import Handler, SessionContext, load_handler
from ray_alpcrun.runtime import HandlerRuntime, SharedSpec
from ray_alpcrun.shared_data import DEFAULT_LATEST_REFRESH_S, SharedDataCache
from ray_alpcrun.types import InstructionType, SharedData, WorkerStatus

pytestmark = pytest.mark.timeout(60)
BIND, UNBIND = InstructionType.BIND, InstructionType.UNBIND
IDLE, BUSY = WorkerStatus.IDLE, WorkerStatus.BUSY


# --- shared data: the cache ------------------------------------------------------


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(levels: dict[int, bytes], ttl_s: float | None = None, **kw: Any) -> Any:
    calls: list[int | None] = []
    gate = asyncio.Event()
    gate.set()
    latest = {"level": max(levels)}

    async def fetch(session_id: str, level: int | None) -> SharedData:
        calls.append(level)
        await gate.wait()
        served = latest["level"] if level is None else level
        return SharedData(session_id, served, levels[served], ttl_s)

    async def share(session_id: str, level: int | None, payload: bytes) -> tuple[Any, ...]:
        return (level, payload)

    return SharedDataCache(fetch, share, **kw), calls, gate, latest


async def test_a_cancelled_first_waiter_does_not_fail_the_others() -> None:
    cache, calls, gate, _ = _cache({1: b"one"})
    gate.clear()
    first = asyncio.create_task(cache.get("S", 1))
    await asyncio.sleep(0)  # ok: let the first waiter start the load
    others = [asyncio.create_task(cache.get("S", 1)) for _ in range(3)]
    await asyncio.sleep(0)  # ok: the others now wait on the same load
    first.cancel()  # its stream broke
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*others), 5) == [(1, b"one")] * 3
    assert calls == [1]


async def test_forget_during_a_load_answers_the_waiters() -> None:
    cache, _calls, gate, _ = _cache({1: b"one"})
    gate.clear()
    waiters = [asyncio.create_task(cache.get("S", 1)) for _ in range(2)]
    await asyncio.sleep(0)  # ok: the load is under way
    cache.forget("S")
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [(1, b"one")] * 2
    assert len(cache) == 0  # not cached for a session that ended


async def test_levels_exactly_as_asked_latest_follows_and_ttl_expires() -> None:
    clock = Clock()
    cache, calls, _, latest = _cache(
        {1: b"one", 2: b"two", 3: b"three"}, ttl_s=10.0, clock=clock, max_entries=8
    )
    latest["level"] = 2
    assert await cache.get("S", 2) == (2, b"two")
    assert await cache.get("S", 1) == (1, b"one")  # older after newer: exactly level 1
    assert await cache.get("S", None) == (2, b"two")
    latest["level"] = 3  # the cache now serves a newer level
    clock.now = 4.0
    assert await cache.get("S", None) == (2, b"two")  # within the refresh interval
    clock.now = 11.0
    assert await cache.get("S", None) == (3, b"three")  # ttl passed: asked again
    assert await cache.get("S", 1) == (1, b"one")
    assert calls == [2, 1, None, None, 1]


async def test_latest_without_a_ttl_is_refreshed() -> None:
    clock = Clock()
    cache, calls, _, latest = _cache({1: b"one", 2: b"two"}, clock=clock, latest_refresh_s=1.0)
    latest["level"] = 1
    assert await cache.get("S", None) == (1, b"one")
    latest["level"] = 2
    clock.now = 2.0
    assert await cache.get("S", None) == (2, b"two")
    assert await cache.get("S", 1) == (1, b"one") and calls == [None, None, 1]


async def test_latest_is_re_asked_at_the_refresh_interval_whatever_the_ttl() -> None:
    # Before: a 600 s ttl kept batches without a level on level 1 for 10 minutes.
    clock = Clock()
    cache, calls, _, latest = _cache({1: b"one", 2: b"two"}, ttl_s=600.0, clock=clock)
    latest["level"] = 1
    assert await cache.get("S", None) == (1, b"one")
    latest["level"] = 2  # published; the cache serves it from now on
    clock.now = DEFAULT_LATEST_REFRESH_S
    assert await cache.get("S", None) == (2, b"two")
    assert calls == [None, None]
    assert DEFAULT_LATEST_REFRESH_S <= 5.0  # docs/handlers.md's promise: seen within 10 s


async def test_a_refresh_that_finds_the_same_level_keeps_its_handle() -> None:
    clock = Clock()
    shares: list[int | None] = []

    async def fetch(session_id: str, level: int | None) -> SharedData:
        return SharedData(session_id, 1 if level is None else level, b"one", 600.0)

    async def share(session_id: str, level: int | None, payload: bytes) -> object:
        shares.append(level)
        return object()  # a fresh handle each time: identity tells them apart

    cache = SharedDataCache(fetch, share, clock=clock, latest_refresh_s=1.0)
    first = await cache.get("S", None)
    clock.now = 1.0
    assert await cache.get("S", None) is first  # re-asked, same level: no second copy
    named = await cache.get("S", 1)
    assert named is not first and shares == [1, 1] and cache.fetches == 3
    clock.now = 2.0
    assert await cache.get("S", None) is first  # the held one, not a third copy


async def test_the_cache_is_bounded() -> None:
    cache, _, _, _ = _cache({1: b"one"}, max_entries=3)
    for i in range(10):
        await cache.get(f"S{i}", 1)
    assert len(cache) == 3


# --- shared data: the handler runtime --------------------------------------------


class Seen(Handler):
    def __init__(self) -> None:
        self.updates: list[tuple[int | None, int | None]] = []

    def process(self, payload: bytes, session: SessionContext) -> bytes:
        return repr((session.update_level, session.shared)).encode()

    def on_shared_update(self, session: SessionContext, previous_level: int | None) -> None:
        self.updates.append((previous_level, session.update_level))


def test_runtime_gives_each_batch_its_own_shared_data() -> None:
    handler = Seen()
    rt = HandlerRuntime(handler)

    def spec(level: int) -> SharedSpec:
        return SharedSpec(level, lambda: f"L{level}".encode())

    def run(shared: SharedSpec | None) -> bytes | None:
        return rt.run("S", [b"x"], shared)[0][0]

    assert run(spec(2)) == b"(2, b'L2')"
    assert run(None) == b"(None, None)"  # before: the session's last shared data
    assert run(spec(1)) == b"(1, b'L1')"  # before: silently level 2
    assert run(spec(3)) == b"(3, b'L3')"
    assert handler.updates == [(2, 3)]

    def fn(payload: bytes, shared: bytes | None) -> bytes:
        return b"none" if shared is None else bytes(shared)

    frt = HandlerRuntime(load_handler(fn))
    assert frt.run("S", [b"x"], spec(1)) == [(b"L1", None)]
    assert frt.run("S", [b"x"], None) == [(b"none", None)]


# --- the bridge against a plain-grpcio queue manager -----------------------------


class FlakyQueue:
    """Registers every worker, then drops the registration with UNAVAILABLE."""

    def __init__(self) -> None:
        self.registrations = 0
        self.closed_sessions = 0
        self.enough = asyncio.Event()

    async def WorkerUpdate(self, requests: Any, context: Any) -> Any:
        self.registrations += 1
        await context.send_initial_metadata((("workerid", f"W{self.registrations}"),))
        if self.registrations >= 5:
            self.enough.set()
        async for _state in requests:  # the IDLE report
            break
        await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        yield pb.Instruction()  # never reached; makes this a generator

    async def CloseSession(self, request: Any, context: Any) -> Any:
        self.closed_sessions += 1
        return pb.Status()

    async def GetSharedData(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such session")


async def _flaky_server(fake: FlakyQueue) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    q = grpc.method_handlers_generic_handler("ghpc.v1.Queue", {
        "WorkerUpdate": grpc.stream_stream_rpc_method_handler(
            fake.WorkerUpdate, pb.WorkerState.FromString, pb.Instruction.SerializeToString),
        "CloseSession": grpc.unary_unary_rpc_method_handler(
            fake.CloseSession, pb.Session.FromString, pb.Status.SerializeToString),
    })  # fmt: skip
    c = grpc.method_handlers_generic_handler("ghpc.v1.Cache", {
        "GetSharedData": grpc.unary_unary_rpc_method_handler(
            fake.GetSharedData, pb.SharedData.FromString, pb.SharedData.SerializeToString),
    })  # fmt: skip
    server.add_generic_rpc_handlers([q, c])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class NoCompute:
    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        return payload

    async def process(self, session_id: str, payloads: list[bytes], shared: Any) -> Any:
        return [(p, None) for p in payloads]

    async def end_session(self, session_id: str) -> None:
        return None


async def test_reconnects_after_successful_registrations_never_exhaust_attempts() -> None:
    fake = FlakyQueue()
    server, port = await _flaky_server(fake)
    address = f"127.0.0.1:{port}"
    settings = WorkerSettings(
        address, address, "k", "ghpc.v1", "n", "p", 1,
        backoff_initial_s=0.001, backoff_max_s=0.01, max_connect_attempts=2,
    )  # fmt: skip
    worker = BridgeWorker(settings, NoCompute())
    try:
        await worker.preflight()
        # Side-effect free: the preflight never closes anything on the queue manager.
        assert fake.closed_sessions == 0 and fake.registrations == 0
        run = asyncio.create_task(worker.run())
        enough = asyncio.create_task(fake.enough.wait())
        await asyncio.wait({run, enough}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        # Before: the third failure in the bridge's life ended it with exit 7.
        assert not run.done(), run.exception()
        assert fake.registrations >= 5
        await worker.stop(drain=False)
        await asyncio.wait_for(run, 10)
    finally:
        await server.stop(None)


async def test_unreachable_queue_manager_still_ends_after_the_attempts() -> None:
    settings = WorkerSettings(
        "127.0.0.1:1", "127.0.0.1:1", "k", "ghpc.v1", "n", "p", 1,
        backoff_initial_s=0.001, backoff_max_s=0.01, max_connect_attempts=2,
    )  # fmt: skip
    worker = BridgeWorker(settings, NoCompute())
    with pytest.raises(errors.FatalError) as info:
        await asyncio.wait_for(worker.run(), 30)
    assert info.value.exit_code == errors.EXIT_UNAVAILABLE


# --- the devserver keeps gRPC's default keepalive policy ---------------------------


async def test_devserver_tells_off_a_client_that_pings_too_often() -> None:
    from ray_alpcrun.devserver import LocalServices

    chatty = [
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with LocalServices() as svc:
        channel = grpc.aio.insecure_channel(svc.queue_address, options=chatty)
        try:
            call = channel.stream_stream(
                "/ghpc.v1.Queue/WorkerUpdate",
                request_serializer=pb.WorkerState.SerializeToString,
                response_deserializer=pb.Instruction.FromString,
            )(metadata=(("api_key", svc.api_key), ("node", "n"), ("pod", "p")))
            await call.initial_metadata()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "too many pings" in (info.value.details() or "").lower(), info.value
        finally:
            await channel.close(None)


# --- TLS per service -----------------------------------------------------------------


def test_tls_is_set_per_service() -> None:
    import argparse

    from ray_alpcrun.config import Env
    from ray_alpcrun.worker_cli import add_worker_flags, service_config

    def parse(env: Env, *argv: str) -> Any:
        p = argparse.ArgumentParser()
        add_worker_flags(p, env)
        return service_config(p.parse_args(["--handler", "m:f", *argv]), env)

    guide = parse(Env(), "--ca-cert", "/certs/ca.crt")  # the guide's deployment
    assert guide.tls is not None and guide.tls.ca_cert == "/certs/ca.crt"
    assert guide.cache_tls is None  # before: the node cache got TLS too (exit 5)
    both = parse(Env(), "--ca-cert", "q.crt", "--cache-ca-cert", "c.crt")
    assert both.tls is not None and both.cache_tls is not None
    assert (both.tls.ca_cert, both.cache_tls.ca_cert) == ("q.crt", "c.crt")
    from_env = parse(Env(ca_cert="q.crt", cache_ca_cert="c.crt"))
    assert from_env.tls is not None and from_env.cache_tls is not None
    assert Env.read({"METALCORE_CACHE_CA_CERT": "c.crt"}).cache_ca_cert == "c.crt"
