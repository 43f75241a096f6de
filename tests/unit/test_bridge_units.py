"""Pure pieces of the bridge: the shared-data cache, backoff and fatal-error
classification. No network, no Ray. (Result and dead batches: test_answers.py.)"""

from __future__ import annotations

import asyncio
import random

import pytest

from ray_alpcrun import errors
from ray_alpcrun.bridge import debugging
from ray_alpcrun.bridge.settings import WorkerSettings, backoff_delay, fatal_for
from ray_alpcrun.shared_data import SharedDataCache
from ray_alpcrun.transport import TlsFiles
from ray_alpcrun.types import SharedData


async def test_shared_cache_fetches_once_per_level_and_drops_older() -> None:
    calls: list[tuple[str, int | None]] = []
    gate = asyncio.Event()

    async def fetch(session_id: str, level: int | None) -> SharedData:
        calls.append((session_id, level))
        await gate.wait()
        return SharedData(session_id, level, f"L{level}".encode())

    async def share(session_id: str, level: int | None, payload: bytes) -> object:
        return ("handle", level, payload)

    cache = SharedDataCache(fetch, share)
    waiters = [asyncio.create_task(cache.get("S", 1)) for _ in range(5)]
    await asyncio.sleep(0)  # ok: let the five waiters reach the cache before the fetch completes
    gate.set()
    handles = await asyncio.gather(*waiters)
    assert calls == [("S", 1)]
    assert all(h == ("handle", 1, b"L1") for h in handles)
    assert await cache.get("S", 2) == ("handle", 2, b"L2")
    assert calls == [("S", 1), ("S", 2)] and len(cache) == 2  # level 1 may be asked again
    cache.forget("S")
    assert len(cache) == 0


async def test_shared_cache_failure_is_not_cached() -> None:
    attempts = 0

    async def fetch(session_id: str, level: int | None) -> SharedData:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise errors.NotFoundError("NOT_FOUND", "no level 3")
        return SharedData(session_id, level, b"ok")

    async def share(session_id: str, level: int | None, payload: bytes) -> bytes:
        return payload

    cache = SharedDataCache(fetch, share)
    with pytest.raises(errors.SharedDataUnavailable, match=r"level 3.*NOT_FOUND"):
        await cache.get("S", 3)
    assert await cache.get("S", 3) == b"ok"


def test_backoff_is_bounded_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(a, 0.1, 2.0, rng) for a in range(12)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) == len(delays)
    assert max(backoff_delay(1, 0.1, 2.0, rng) for _ in range(200)) <= 0.2


def _settings(tls: TlsFiles | None = None) -> WorkerSettings:
    return WorkerSettings("127.0.0.1:1", "127.0.0.1:2", "k", "ghpc.v1", "n", "p", 1, tls=tls)


def test_fatal_classification() -> None:
    auth = fatal_for(errors.AuthError("PERMISSION_DENIED", "wrong"), _settings(), "queue manager")
    assert auth is not None and auth.exit_code == errors.EXIT_AUTH and "API key" in auth.reason
    tls = fatal_for(
        errors.UnavailableError("UNAVAILABLE", "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED"),
        _settings(TlsFiles(ca_cert="/certs/ca.crt")),
        "queue manager",
    )
    assert tls is not None and tls.exit_code == errors.EXIT_TLS and "/certs/ca.crt" in tls.reason
    pkg = fatal_for(errors.RpcError("UNIMPLEMENTED", "x"), _settings(), "queue manager")
    assert pkg is not None and pkg.exit_code == errors.EXIT_CONFIG and "proto-package" in pkg.reason
    assert fatal_for(errors.UnavailableError("UNAVAILABLE", "refused"), _settings(), "q") is None


async def test_shared_cache_retries_an_unavailable_node_cache() -> None:
    attempts = 0

    async def fetch(session_id: str, level: int | None) -> SharedData:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise errors.UnavailableError("UNAVAILABLE", "restarting")
        return SharedData(session_id, level, b"back")

    async def share(session_id: str, level: int | None, payload: bytes) -> bytes:
        return payload

    cache = SharedDataCache(fetch, share, attempts=3, first_pause_s=0.001)
    assert await cache.get("S", 1) == b"back" and attempts == 3
    gone = SharedDataCache(fetch, share, attempts=1)
    attempts = 0
    with pytest.raises(errors.SharedDataUnavailable, match="UNAVAILABLE"):
        await gone.get("S", 1)


async def test_a_node_cache_down_for_seconds_is_waited_for_then_given_up_on() -> None:
    # The chaos run (issue 23): four tries in 1.75 s dead-lettered every batch
    # that needed shared data while the node cache was unreachable for 1.6-3 s.
    now = [0.0]
    down_until = [7.0]
    tries = 0

    async def fetch(session_id: str, level: int | None) -> SharedData:
        nonlocal tries
        tries += 1
        now[0] += 1.0  # each failed try costs a second of the (fake) clock
        if now[0] < down_until[0]:
            raise errors.UnavailableError("UNAVAILABLE", "failed to connect to all addresses")
        return SharedData(session_id, level, b"back")

    async def share(session_id: str, level: int | None, payload: bytes) -> bytes:
        return payload

    cache = SharedDataCache(
        fetch, share, first_pause_s=0.001, max_pause_s=0.002, clock=lambda: now[0]
    )
    assert await cache.get("S", 1) == b"back" and tries == 7
    now[0], down_until[0], tries = 0.0, 1e9, 0  # down for good: given up after the wait
    with pytest.raises(errors.SharedDataUnavailable, match="UNAVAILABLE"):
        await cache.get("S", 2)
    assert now[0] >= 15.0 and tries == 15


@pytest.mark.skipif(debugging._libc() is None, reason="glibc's mallinfo2 only")
def test_heap_line_tells_memory_in_use_from_memory_held_free() -> None:
    import re

    figures = r"in use ([\d.]+) MB, held free ([\d.]+) MB, rss ([\d.]+) MB"
    blocks = [bytearray(4096) for _ in range(20_000)]  # ~80 MB in use
    busy = re.fullmatch(f"heap: {figures}", debugging.heap_line() or "")
    assert busy is not None and float(busy.group(1)) >= 60
    del blocks
    line = debugging.heap_line(trim=True) or ""
    after = re.fullmatch(f"heap: {figures}; after malloc_trim: {figures}", line)
    assert after is not None, line
    assert float(after.group(1)) < float(busy.group(1)) - 60  # freed: no longer in use
    assert float(after.group(6)) <= float(after.group(3))  # trimming gives back, never takes
    assert debugging.MemoryTrace().growth()[0].startswith("heap: ")
