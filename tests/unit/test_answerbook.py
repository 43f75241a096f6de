"""The answer book (``bridge.answerbook``): one computation per batch until its answer
is sent, kept a bounded while after, failures never kept. No gRPC, no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ray_alpcrun.bridge.answerbook import AnswerBook, batch_key
from ray_alpcrun.runtime import Outcome
from ray_alpcrun.types import Batch, Message

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(batch_id: str, *task_ids: str, level: int | None = None) -> Batch:
    messages = [Message(t, t.encode()) for t in task_ids]
    return Batch(batch_id, "S", messages=messages, use_shared_data=level is not None,
                 required_shared_data_update_level=level)  # fmt: skip


def test_a_key_names_the_session_the_batch_its_tasks_and_its_level() -> None:
    assert batch_key("S", batch("b", "1", "2")) == batch_key("S", batch("b", "1", "2"))
    others = [
        batch_key("T", batch("b", "1", "2")),
        batch_key("S", batch("c", "1", "2")),
        batch_key("S", batch("b", "1")),  # a remainder re-queued after a partial answer
        batch_key("S", batch("b", "1", "2", level=3)),
    ]
    assert batch_key("S", batch("b", "1", "2")) not in others
    assert len(set(others)) == len(others)


async def test_deliveries_share_one_computation_until_it_is_sent() -> None:
    book = AnswerBook()
    runs = 0
    release = asyncio.Event()

    async def compute() -> list[Outcome]:
        nonlocal runs
        runs += 1
        await release.wait()
        return [(b"r", None)]

    key = batch_key("S", batch("b", "1"))
    first, again = book.work(key, compute)
    assert not again
    waiting = asyncio.ensure_future(asyncio.shield(first))
    await asyncio.sleep(0)  # ok: one turn of the loop: the first delivery awaits it
    waiting.cancel()  # the first delivery's stream ended: the computation goes on
    second, again = book.work(key, compute)
    assert again and second is first
    release.set()
    assert await asyncio.shield(second) == [(b"r", None)]
    book.sent(key)
    assert len(book) == 0
    third, again = book.work(key, compute)
    assert not again
    await third
    assert runs == 2


async def test_a_batch_that_failed_as_a_whole_is_not_kept() -> None:
    book = AnswerBook()

    async def fails() -> list[Outcome]:
        raise RuntimeError("no shared data")

    key = batch_key("S", batch("b", "1"))
    work, _ = book.work(key, fails)
    with pytest.raises(RuntimeError):
        await work
    await asyncio.sleep(0)  # ok: one turn of the loop runs the done callbacks
    assert len(book) == 0
    assert not book.work(key, fails)[1]
    await asyncio.gather(book.work(key, fails)[0], return_exceptions=True)


async def test_what_is_kept_goes_after_keep_s_or_past_its_bounds() -> None:
    clock = Clock()
    book = AnswerBook(keep_s=10.0, max_entries=2, max_bytes=100, clock=clock)

    async def kept(name: str, size: int) -> bool:
        work, again = book.work(batch_key("S", batch(name, "1")), lambda: answer(size))
        await work
        await asyncio.sleep(0)  # ok: one turn of the loop runs the done callbacks
        return again

    async def answer(size: int) -> list[Outcome]:
        return [(b"x" * size, None)]

    assert not await kept("a", 10) and not await kept("b", 10)
    assert len(book) == 2
    assert not await kept("c", 10)  # a third: the oldest (a) goes
    assert len(book) == 2 and await kept("c", 10) and not await kept("a", 10)
    clock.now = 11.0
    assert not await kept("d", 1)
    assert len(book) == 1  # b, c and a were kept longer than keep_s
    assert not await kept("e", 200)  # past max_bytes: kept only while it runs
    assert len(book) == 0


async def test_a_released_session_and_a_closed_book_leave_nothing_running() -> None:
    book = AnswerBook()
    forever = asyncio.Event()

    async def hangs() -> list[Outcome]:
        await forever.wait()
        return []

    mine, _ = book.work(batch_key("S", batch("a", "1")), hangs)
    other, _ = book.work(batch_key("T", batch("a", "1")), hangs)
    book.forget("S")
    await asyncio.gather(mine, return_exceptions=True)
    assert mine.cancelled() and not other.done() and len(book) == 1
    await book.close()
    assert other.cancelled() and len(book) == 0


async def test_what_a_broken_stream_left_is_published_at_once() -> None:
    book = AnswerBook()
    release = asyncio.Event()

    async def compute() -> list[Outcome]:
        await release.wait()
        return [(b"r", None)]

    key = batch_key("S", batch("b", "1"))
    book.work(key, compute)
    book.orphaned(key)  # its stream broke while it ran
    assert book.take_published() == [key] and book.take_published() == []
    asking = asyncio.ensure_future(book.outcomes(key))  # a peer asks before it ends
    await asyncio.sleep(0)  # ok: one turn of the loop: the peer's ask waits on the computation
    assert not asking.done()
    release.set()
    assert await asking == [(b"r", None)]
    assert await book.outcomes(key) == [(b"r", None)]  # kept
    sent = batch_key("S", batch("c", "1"))
    await book.work(sent, compute)[0]
    book.sent(sent)
    book.orphaned(sent)  # answered: nothing kept, nothing to publish
    assert book.take_published() == [] and await book.outcomes(sent) is None


async def test_a_batch_another_bridge_keeps_is_asked_for_before_it_runs() -> None:
    book = AnswerBook()
    asked: list[tuple[str, Any]] = []
    runs = 0

    async def fetch(holder: str, key: Any) -> list[Outcome] | None:
        asked.append((holder, key))
        return [(b"kept", None)] if holder == "has-it" else None

    async def compute() -> list[Outcome]:
        nonlocal runs
        runs += 1
        return [(b"ran", None)]

    book.fetch = fetch
    first, second = batch_key("S", batch("a", "1")), batch_key("S", batch("b", "1"))
    book.learn([first], "has-it")
    book.learn([second], "lost-it")
    assert await book.work(first, compute)[0] == [(b"kept", None)] and runs == 0
    assert await book.work(second, compute)[0] == [(b"ran", None)] and runs == 1
    assert [holder for holder, _ in asked] == ["has-it", "lost-it"]
    book.learn([batch_key("T", batch("c", "1"))], "has-it")
    book.forget("T")  # its session released here: not asked for any more
    await book.work(batch_key("T", batch("c", "1")), compute)[0]
    assert len(asked) == 2 and runs == 2
