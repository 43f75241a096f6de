"""Client pieces that need no server: results, batching, submission counters,
the private loop thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ray_alpcrun import wire
from ray_alpcrun.answers import answer_bytes_bound
from ray_alpcrun.client import TaskFailed, TaskResult
from ray_alpcrun.client.batching import checked, chunks, pack
from ray_alpcrun.client.limits import refused_limit, too_large
from ray_alpcrun.client.results import Submission
from ray_alpcrun.loop_thread import LoopThread
from ray_alpcrun.types import Batch, Message


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


def test_chunks_check_payload_types() -> None:
    chunk: list[bytes] = [b"a" * 4, bytearray(b"b" * 4), memoryview(b"c")]  # type: ignore[list-item]
    assert checked(chunk) == [b"aaaa", b"bbbb", b"c"]
    assert all(type(p) is bytes for p in chunk)
    with pytest.raises(TypeError, match="bytes"):
        checked(["text"])  # type: ignore[list-item]


def test_pack_keeps_order_and_measures_what_is_encoded() -> None:
    messages = [Message(f"t{i}", b"x" * 40) for i in range(6)] + [Message("big", b"y" * 500)]
    messages.insert(3, Message("huge", b"z" * 5000))
    head = Batch(id="b1", session_id="s")
    header = wire.batch_header_bytes(head)
    limit = header + 2 * wire.message_bytes(messages[0]) + 1  # two of the small ones per batch
    limit = max(limit, header + answer_bytes_bound("t0") * 2)
    parts = pack(messages, header, limit)
    assert [m.id for p in parts for m in p.messages] == [m.id for m in messages]
    assert [p.offset for p in parts] == [
        sum(len(q.messages) for q in parts[:i]) for i in range(len(parts))
    ]
    oversized = [p.messages[0].id for p in parts if not p.fits]
    assert oversized == ["huge"] and all(len(p.messages) == 1 for p in parts if not p.fits)
    for p in parts:
        if p.fits:
            assert wire.batch_bytes(Batch(id="b1", session_id="s", messages=p.messages)) <= limit


def test_pack_bounds_the_tasks_by_their_answers() -> None:
    # Issue 18.2 (c): 150,000 tasks of 8 bytes made a 12 MB batch (payload bytes
    # were counted, not what protobuf writes), which broke the stream.
    messages = [Message(f"c0ffee12.{i}", b"12345678") for i in range(150_000)]
    limit = 4 * 1024 * 1024 - 64 * 1024
    parts = pack(messages, 40, limit)
    assert sum(len(p.messages) for p in parts) == 150_000 and all(p.fits for p in parts)
    for p in parts:
        assert 40 + sum(wire.message_bytes(m) for m in p.messages) <= limit
        # Every answer fits, even when each task fails with a (trimmed) error.
        assert sum(answer_bytes_bound(m.id) for m in p.messages) <= limit - 40


async def test_chunks_from_sync_and_async_iterables() -> None:
    sync_parts = [c async for c in chunks((bytes([i]) for i in range(7)), 3)]
    assert [len(c) for c in sync_parts] == [3, 3, 1]

    async def agen() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([i])

    async_parts = [c async for c in chunks(agen(), 2)]
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


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_refusal_names_the_receivers_limit_and_the_error_names_both() -> None:
    over = "SERVER: Received message larger than max (5242964 vs. 4194304)"
    assert refused_limit(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, over)) == 4194304
    assert refused_limit(_Status(grpc.StatusCode.INTERNAL, over)) is None
    assert refused_limit(_Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota spent")) is None
    queue = too_large("task payload", 5 << 20, 16 << 20, 4194304)
    assert "queue manager's message limit of 4194304 bytes" in queue
    assert "Client(max_message_bytes=16777216)" in queue
    own = too_large("task payload", 5 << 20, 4 << 20)
    assert "max_message_bytes=4194304" in own and "Client(max_message_bytes=...)" in own


class _ResultCall:
    """A ``ClientStream`` call whose server ends it (OK) once ``ended`` is set."""

    def __init__(self, ended: asyncio.Event) -> None:
        self.ended = ended

    async def read(self) -> object:
        await self.ended.wait()
        return grpc.aio.EOF

    async def write(self, batch: Batch) -> None:
        return None

    async def done_writing(self) -> None:
        return None

    def cancel(self) -> bool:
        return True


class _DeadLetterCall:
    """``ClientStreamDeadLetters``: the server has taken both batches off its queue
    (each is handed out once); the second is still on its way when the session's
    result stream ends."""

    def __init__(self, batches: list[Batch], ended: asyncio.Event, arrive: asyncio.Event):
        self.batches, self.ended, self.arrive = list(batches), ended, arrive

    async def read(self) -> object:
        if not self.batches:
            return grpc.aio.EOF
        if len(self.batches) == 1:
            self.ended.set()  # the session closed and drained: its result stream ends
            await self.arrive.wait()
        return self.batches.pop(0)

    def cancel(self) -> bool:
        return True


async def _closing_session_stream() -> tuple[Any, list[Batch], asyncio.Event]:
    """A client stream with two tasks whose session closes: both are dead-lettered,
    the poller takes both off the queue manager and reads the first, and the
    result stream ends before the second arrives (set the returned event)."""
    from types import SimpleNamespace

    from ray_alpcrun.client.stream import ClientStream

    ended, arrive = asyncio.Event(), asyncio.Event()
    dead = [
        Batch(id="b1", session_id="S", messages=[Message("t0", b"0", error="closed")], dead=True),
        Batch(id="b2", session_id="S", messages=[Message("t1", b"1", error="closed")], dead=True),
    ]
    stub = SimpleNamespace(
        ClientStream=lambda requests, metadata: _ResultCall(ended),
        ClientStreamDeadLetters=lambda request, metadata: _DeadLetterCall(dead, ended, arrive),
    )
    kept: list[Batch] = []
    stream = ClientStream(stub, "S", (), 0.001, keep_dead_letter=kept.append)  # type: ignore[arg-type]
    stream.open()
    sub = Submission(10)
    stream.attach(sub)
    tasks = [Message("t0", b"0"), Message("t1", b"1")]
    await stream.send(sub, Batch(id="b", session_id="S", messages=tasks), 0)
    await asyncio.wait_for(ended.wait(), 5)
    return stream, kept, arrive


async def test_dead_letters_on_their_way_when_the_result_stream_ends_are_kept() -> None:
    # The chaos run (issue 23): a session closed while its batches ran ended its
    # result stream while the client was reading its dead letters; the read was
    # cancelled and the batches on their way, already taken off the queue
    # manager's dead-letter queue, were lost (24 tasks answered by nobody).
    stream, kept, arrive = await _closing_session_stream()
    for _ in range(100):  # the reader sees the end of the stream
        if not stream.healthy:
            break
        await asyncio.sleep(0.01)  # ok: polls the stream's state
    arrive.set()
    for _ in range(200):
        if len(kept) == 2:
            break
        await asyncio.sleep(0.01)  # ok: polls for the second batch (a backstop)
    await stream.close()
    assert [b.id for b in kept] == ["b1", "b2"]  # kept for session.dead_letters()
    assert stream.ignored == 0  # routed after the failure: nothing answered twice


async def test_dead_letters_waits_for_the_batches_a_poll_still_reads() -> None:
    # The chaos run in CI (issue 23): a closed session's result stream ended while
    # the poller read its 11 dead-letter batches; session.dead_letters() asked the
    # queue manager meanwhile, got none (taken already) and returned the 4 kept so
    # far: 56 tasks were answered by nobody. It now waits for the poll to end.
    stream, kept, arrive = await _closing_session_stream()
    settled = asyncio.ensure_future(stream.dead_letters_settled())
    await asyncio.sleep(0.05)  # ok: the poll is held on its second batch meanwhile
    assert not settled.done() and [b.id for b in kept] == ["b1"]
    arrive.set()
    await asyncio.wait_for(settled, 5)
    assert [b.id for b in kept] == ["b1", "b2"]
    await stream.close()
