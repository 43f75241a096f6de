"""The notebook API: RayPool.map / amap / set_shared and its error semantics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from ray_alpcrun.config import PoolConfig
from ray_alpcrun.errors import AlpcrunError, SessionSetupError, TaskFailed, TasksFailed
from ray_alpcrun.pool.notebook import RayPool

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def echo(ray_session: Any) -> Iterator[RayPool]:
    with RayPool(
        "tests.support.handlers:echo", shared=b"v1", config=PoolConfig(num_actors=2, min_chunk=2)
    ) as pool:
        yield pool


def test_map_with_shared_data_in_order(echo: RayPool) -> None:
    echo.set_shared(b"m1")
    payloads = [f"p{i}".encode() for i in range(50)]
    assert echo.map(payloads) == [p + b"|m1" for p in payloads]
    assert echo.map([]) == []


def test_set_shared_raises_the_level(echo: RayPool) -> None:
    level = echo.set_shared(b"v2")
    assert level == echo.update_level and level >= 2
    assert echo.map([b"a", b"b"]) == [b"a|v2", b"b|v2"]


def test_failed_tasks_raise_or_come_back_in_place(echo: RayPool) -> None:
    payloads = [b"ok", b"fail-1", b"ok2", b"fail-2"]
    with pytest.raises(TasksFailed) as info:
        echo.map(payloads)
    failed = info.value
    assert isinstance(failed, TaskFailed)
    assert [(f.task_id, f.error) for f in failed.failures] == [
        ("1", "ValueError: asked to fail: fail-1"),
        ("3", "ValueError: asked to fail: fail-2"),
    ]
    assert "1 more failed" in str(failed)
    mixed = echo.map(payloads, return_errors=True)
    assert isinstance(mixed[0], bytes) and mixed[0].startswith(b"ok|")
    assert isinstance(mixed[1], TaskFailed) and mixed[1].task_id == "1"
    assert isinstance(mixed[3], TaskFailed)


async def test_amap_and_map_inside_a_running_loop(echo: RayPool) -> None:
    # A loop runs in this thread, as in Jupyter: map must still work.
    payloads = [f"q{i}".encode() for i in range(20)]
    expected = echo.map(payloads)
    assert await echo.amap(payloads) == expected
    [failed] = await echo.amap([b"fail"], return_errors=True)
    assert isinstance(failed, TaskFailed) and failed.error.startswith("ValueError")


def test_progress_bar_path(echo: RayPool) -> None:
    payloads = [f"r{i}".encode() for i in range(40)]
    assert echo.map(payloads, progress=True) == echo.map(payloads)


def test_class_handler_sees_levels_and_state() -> None:
    with RayPool("tests.support.handlers:Counter", actors=1, shared=b'{"k": 1}') as pool:
        first = [json.loads(r) for r in pool.map([b"a", b"b"])]
        assert [r["count"] for r in first] == [1, 2]
        assert first[0]["shared"] == {"k": 1} and first[0]["session"] == pool.session_id
        pool.set_shared(b'{"k": 2}')
        again = json.loads(pool.map([b"c"])[0])
        assert (again["count"], again["level"], again["shared"]) == (3, 2, {"k": 2})
        assert again["updates"] == [[1, 2]]
        status = pool.status()
        assert status["actors"][0]["shared_decodes"] == 2
        assert status["actors"][0]["sessions"] == [pool.session_id]


def test_setup_error_and_closed_pool() -> None:
    pool = RayPool("tests.support.handlers:BrokenStart", actors=1)
    with pool, pytest.raises(SessionSetupError):
        pool.map([b"a"])
    with pytest.raises(AlpcrunError, match="not started"):
        pool.map([b"a"])


async def test_async_context_manager() -> None:
    async with RayPool(lambda p, s: p[::-1], actors=1) as pool:
        assert await pool.amap([b"abc"]) == [b"cba"]
