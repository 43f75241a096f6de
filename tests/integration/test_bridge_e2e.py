"""End to end: client -> local queue manager -> bridge (Ray actor) -> pool actors -> client.

Every test asserts that each task got exactly one answer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ray_alpcrun import errors
from ray_alpcrun.bridge.launch import start_bridge
from ray_alpcrun.client import AsyncClient, TaskResult
from tests.support import bridge_handlers
from tests.support.bridge_support import assert_exactly_once, bridge_config, client_for, ray_get

pytestmark = pytest.mark.timeout(180)


def test_two_sessions_at_once_with_the_function_handler(services: Any, bridge: Any) -> None:
    handle = bridge("tests.support.bridge_handlers:echo", actors=2, slots=2)
    n = 400

    async def one_session(tag: str) -> list[TaskResult]:
        async with AsyncClient(
            services.queue_address,
            services.central_cache_address,
            api_key=services.api_key,
            proto_package=services.proto_package,
        ) as client:
            session = await client.create_session(app_id=f"e2e-{tag}")
            payloads = [
                (f"fail-{tag}-{i}" if i % 50 == 7 else f"{tag}-{i}").encode() for i in range(n)
            ]
            results = await session.run(payloads, batch_size=25, timeout_s=120)
            await session.close()
            return results

    async def both() -> tuple[list[TaskResult], list[TaskResult]]:
        a, b = await asyncio.gather(one_session("a"), one_session("b"))
        return a, b

    for tag, results in zip("ab", asyncio.run(both()), strict=True):
        assert_exactly_once(results, n)
        for r in results:
            if r.index % 50 == 7:
                assert not r.ok and r.error is not None and "ValueError: asked to fail" in r.error
            else:
                assert r.payload == f"{tag}-{r.index}".encode()
    status = ray_get(handle.status())
    assert status["tasks_ok"] == 2 * (n - n // 50) and status["tasks_failed"] == 2 * (n // 50)


def decode(results: list[TaskResult]) -> list[dict[str, Any]]:
    return [json.loads(r.value()) for r in results]


def test_shared_data_levels_and_per_session_state(services: Any, bridge: Any) -> None:
    handle = bridge("tests.support.bridge_handlers:Stateful", actors=1)
    with client_for(services) as client:
        s1 = client.create_session(app_id="state-1")
        s2 = client.create_session(app_id="state-2")
        s1.set_shared_data(json.dumps({"value": "one"}).encode(), level=1)
        first = decode(s1.run([b"x"] * 30, batch_size=10, use_shared_data=True, shared_level=1))
        # Another session in between must not disturb s1's state.
        other = decode(s2.run([b"y"] * 5, batch_size=5))
        s1.set_shared_data(json.dumps({"value": "two"}).encode(), level=2)
        second = decode(s1.run([b"z"] * 30, batch_size=10, use_shared_data=True, shared_level=2))
        s1.close()
        s2.close()
    # Batches of one run are processed concurrently, so counts come in any order
    # within a run; the state carries over from the first run to the second.
    assert sorted(r["count"] for r in first) == list(range(1, 31))
    assert sorted(r["count"] for r in second) == list(range(31, 61))
    assert {(r["level"], r["value"]) for r in first} == {(1, "one")}
    assert {(r["level"], r["value"]) for r in second} == {(2, "two")}
    assert max(second, key=lambda r: r["count"])["updates"] == [[1, 2]]
    assert sorted(r["count"] for r in other) == [1, 2, 3, 4, 5]
    assert {r["session"] for r in other} == {s2.id}
    # Fetched once per (session, level) by the bridge, whatever the batch count.
    assert ray_get(handle.status())["shared_fetches"] == 2


def test_session_start_failure_answers_dead(services: Any, bridge: Any) -> None:
    bridge("tests.support.bridge_handlers:BrokenStart", actors=1)
    with client_for(services) as client:
        session = client.create_session(app_id="broken")
        results = session.run([b"a", b"b", b"c"], batch_size=3, timeout_s=60)
        letters = session.dead_letters()
        session.close()
    assert_exactly_once(results, 3)
    assert all(r.dead and r.error and "cannot start session" in r.error for r in results)
    assert letters == [] or all(b.dead for b in letters)


def test_a_dead_batch_of_10000_tasks_keeps_the_reason(services: Any, bridge: Any) -> None:
    # Issue 18.2 (a): the dead batch (5.3 MB) could not be written; the client saw
    # "delivered 3 times without an answer" instead of the handler's reason.
    bridge("tests.support.bridge_handlers:LongStartError", actors=1)
    with client_for(services) as client:
        session = client.create_session(app_id="setup-fails")
        [first] = session.run([b"first"], timeout_s=60)
        reason = first.error or ""
        assert first.dead and bridge_handlers.LONG_REASON in reason and len(reason) > 200
        results = session.run([b"%d" % i for i in range(10_000)], batch_size=10_000, timeout_s=120)
        session.close()
    assert_exactly_once(results, 10_000)
    assert all(r.dead and (r.error or "").startswith(reason[:200]) for r in results)


def test_one_huge_answer_or_error_fails_only_its_task(services: Any, bridge: Any) -> None:
    # Issue 18.2 (b): one 4.2 MB error turned all 2,000 answers into "result too large".
    bridge("tests.support.bridge_handlers:oversized", actors=2)
    payloads = [b"%04d" % i + b"." * 1020 for i in range(2000)]
    with client_for(services) as client:
        session = client.create_session(app_id="huge")
        runs = {}
        for big in (b"big-answer", b"big-error"):
            payloads[1234] = big
            runs[big] = session.run(payloads, batch_size=2000, timeout_s=120)
        session.close()
    for big, results in runs.items():
        assert_exactly_once(results, 2000)
        by_index = {r.index: r for r in results}
        assert [i for i, r in sorted(by_index.items()) if not r.ok] == [1234], big
        assert all(r.value() == payloads[i] for i, r in by_index.items() if i != 1234)
    [too_large] = [r.error or "" for r in runs[b"big-answer"] if not r.ok]
    assert "result too large: 4200000 bytes" in too_large
    [error] = [r.error or "" for r in runs[b"big-error"] if not r.ok]
    assert error.startswith("ValueError: " + "e" * 100) and len(error) < 1000


def test_missing_shared_level_answers_dead(services: Any, bridge: Any) -> None:
    bridge("tests.support.bridge_handlers:echo", actors=1)
    with client_for(services) as client:
        session = client.create_session(app_id="no-shared")
        results = session.run([b"a", b"b"], batch_size=2, use_shared_data=True, shared_level=9)
        session.close()
    assert_exactly_once(results, 2)
    assert all(r.dead and r.error and "level 9" in r.error for r in results)


def test_actor_dying_mid_batch_loses_nothing(services: Any, bridge: Any, tmp_path: Path) -> None:
    handle = bridge("tests.support.bridge_handlers:crash_once", actors=2)
    marker = tmp_path / "crashed"
    payloads = [f"{marker}|{i}".encode() for i in range(200)]
    with client_for(services) as client:
        session = client.create_session(app_id="crash")
        results = session.run(payloads, batch_size=50, timeout_s=120)
        session.close()
    assert marker.exists(), "the handler never crashed its actor"
    assert_exactly_once(results, 200)
    assert all(r.ok for r in results)
    assert ray_get(handle.status())["actor_restarts"] >= 1


def test_close_mid_flight_then_serve_a_new_session(services: Any, bridge: Any) -> None:
    bridge("tests.support.bridge_handlers:slow", actors=2)
    with client_for(services) as client:
        doomed = client.create_session(app_id="doomed")
        it = doomed.submit([b"s"] * 200, batch_size=10)
        first = next(it)
        assert first.ok
        doomed.close()  # UNBIND arrives while batches are in flight
        fresh = client.create_session(app_id="fresh")
        results = fresh.run([f"{i}".encode() for i in range(50)], batch_size=10, timeout_s=60)
        fresh.close()
    assert_exactly_once(results, 50)
    assert all(r.ok for r in results)


def test_wrong_api_key_stops_the_bridge_with_a_clear_reason(services: Any) -> None:
    import ray

    secret = "wrong-key-5f3a9c"
    handle = start_bridge(
        bridge_config(services, "tests.support.bridge_handlers:echo", 1, api_key=secret)
    )
    code, reason = ray.get(handle.run_ref, timeout=60)
    assert code == errors.EXIT_AUTH
    assert "API key" in reason and secret not in reason
