"""Client pieces that need no server: results, batching, submission counters,
the private loop thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ray_alpcrun.client import TaskFailed, TaskResult
from ray_alpcrun.client.batching import chunks, split_by_size
from ray_alpcrun.client.results import Submission
from ray_alpcrun.loop_thread import LoopThread


def test_task_result_ok_and_value() -> None:
    ok = TaskResult("t1", 0, b"x", None, False, "b1")
    failed = TaskResult("t2", 1, None, "ValueError: no", False, "b1")
    dead = TaskResult("t3", 2, None, "delivered 3 times", True, "b2")
    assert ok.ok and ok.value() == b"x"
    assert not failed.ok and not dead.ok
    with pytest.raises(TaskFailed, match="ValueError: no") as info:
        failed.value()
    assert info.value.task_id == "t2"
    with pytest.raises(TaskFailed, match="delivered 3 times"):
        dead.value()
    assert TaskResult("t4", 3, None, None, False, "b").value() == b""


def test_split_by_size_keeps_order_and_limits() -> None:
    chunk: list[bytes] = [b"a" * 4, bytearray(b"b" * 4), b"c" * 4, b"d" * 10]  # type: ignore[list-item]
    parts = split_by_size(chunk, 8)
    assert parts == [[b"aaaa", b"bbbb"], [b"cccc"], [b"d" * 10]]
    assert all(type(p) is bytes for part in parts for p in part)
    with pytest.raises(TypeError, match="bytes"):
        split_by_size(["text"], 8)


async def test_chunks_from_sync_and_async_iterables() -> None:
    sync_parts = [c async for c in chunks((bytes([i]) for i in range(7)), 3, 1 << 20)]
    assert [len(c) for c in sync_parts] == [3, 3, 1]

    async def agen() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([i])

    async_parts = [c async for c in chunks(agen(), 2, 1 << 20)]
    assert [len(c) for c in async_parts] == [2, 2, 1]
    assert b"".join(b"".join(c) for c in async_parts) == bytes(range(5))


async def test_submission_window_blocks_sender_until_answers_are_taken() -> None:
    sub = Submission(max_pending_tasks=2)
    sub.sent = 2
    waiter = asyncio.ensure_future(sub.wait_for_space())
    await asyncio.sleep(0)  # ok: let the waiter block once
    assert not waiter.done()
    sub.deliver([TaskResult("t", 0, b"", None, False, "b")])
    await asyncio.sleep(0)  # ok: one turn for a (wrong) wake-up
    # An answer waiting for the consumer still holds memory: no room yet.
    assert not waiter.done() and sub.held == 2
    sub.took(1)
    await asyncio.wait_for(waiter, 1.0)
    sub.mark_all_sent()
    sub.deliver([TaskResult("u", 1, b"", None, False, "b")])
    assert sub.outstanding == 0
    # Finished only once the consumer took every answer out of the queue.
    assert not sub.finished
    sub.took(1)
    assert sub.finished


def test_loop_thread_refuses_reentry_from_its_own_loop() -> None:
    lt = LoopThread("test-loop", "the test")
    try:

        async def inner() -> None:
            coro = asyncio.sleep(0)  # ok: a coroutine object to submit, never awaited
            with pytest.raises(RuntimeError, match="own event loop"):
                lt.submit(coro)

        lt.run(inner())
        assert lt.run(asyncio.sleep(0, result=5)) == 5  # ok: a trivial coroutine, no wait
    finally:
        lt.stop()
