"""Coalescer: parts queued behind busy calls travel together; each gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from ray_alpcrun.pool.coalesce import Coalescer


class FakeActor:
    """Calls block until released, so the test decides when each call ends."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: BaseException | None = None

    async def one(self, actor: object, part: str) -> str:
        return (await self.many(actor, [part]))[0]

    async def many(self, actor: object, parts: list[str]) -> list[str]:
        self.calls.append(list(parts))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        return [p.upper() for p in parts]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)  # ok: yields to let queued callbacks run; waits for nothing


async def test_parts_queued_behind_outstanding_calls_are_merged() -> None:
    fake = FakeActor()
    c: Coalescer[str, str] = Coalescer(fake.one, fake.many, max_outstanding=2)
    tasks = [asyncio.create_task(c.call("a", "a", p)) for p in "pqrst"]
    await settle()
    assert fake.calls == [["p"], ["q"]]  # two in flight, three waiting
    fake.gates[0].set()
    await settle()
    assert fake.calls[2] == ["r", "s", "t"]  # one call for everything that queued
    for gate in fake.gates:
        gate.set()
    assert await asyncio.gather(*tasks) == ["P", "Q", "R", "S", "T"]
    assert c.calls == 3


async def test_a_failed_call_fails_only_its_parts() -> None:
    fake = FakeActor()
    c: Coalescer[str, str] = Coalescer(fake.one, fake.many, max_outstanding=1)
    first = asyncio.create_task(c.call("a", "a", "x"))
    queued = [asyncio.create_task(c.call("a", "a", p)) for p in "yz"]
    await settle()
    fake.fail = RuntimeError("actor died")
    fake.gates[0].set()
    with pytest.raises(RuntimeError, match="actor died"):
        await first
    await settle()
    fake.fail = None
    fake.gates[1].set()
    assert await asyncio.gather(*queued) == ["Y", "Z"]


async def test_cancelled_parts_are_not_sent_and_lanes_are_per_actor() -> None:
    fake = FakeActor()
    c: Coalescer[str, str] = Coalescer(fake.one, fake.many, max_outstanding=1)
    busy = asyncio.create_task(c.call("a", "a", "x"))
    other_actor = asyncio.create_task(c.call("b", "b", "w"))
    gone = asyncio.create_task(c.call("a", "a", "y"))
    kept = asyncio.create_task(c.call("a", "a", "z"))
    await settle()
    assert fake.calls == [["x"], ["w"]]
    gone.cancel()
    fake.gates[0].set()
    await settle()
    assert fake.calls[2] == ["z"]
    for gate in fake.gates:
        gate.set()
    assert await busy == "X" and await kept == "Z" and await other_actor == "W"


async def test_one_call_in_flight_and_parts_worth_a_call_go_at_once() -> None:
    """With one call in flight, small parts wait and travel together; a queue that
    is worth a call of its own (here: 3 parts or more) goes out beside it."""
    fake = FakeActor()
    c: Coalescer[str, str, str] = Coalescer(
        fake.one, fake.many, max_outstanding=1, worth_a_call=lambda parts: len(parts) >= 3
    )
    tasks = [asyncio.create_task(c.call("a", "a", p)) for p in "pqr"]
    await settle()
    assert fake.calls == [["p"]]  # q and r wait for p's call
    tasks += [asyncio.create_task(c.call("a", "a", p)) for p in "st"]
    await settle()
    assert fake.calls == [["p"], ["q", "r", "s"]]  # q r s went out early, t waits
    fake.gates[0].set()
    await settle()
    assert len(fake.calls) == 2  # the early call is still in flight: t still waits
    fake.gates[1].set()
    await settle()
    assert fake.calls[2:] == [["t"]]  # nothing in flight: t goes
    fake.gates[2].set()
    assert await asyncio.gather(*tasks) == ["P", "Q", "R", "S", "T"]


async def test_close_ends_the_calls_in_flight_and_the_parts_queued() -> None:
    # Issue 18 item 11: the pool's close left the coalescer's sends running, unowned.
    fake = FakeActor()
    c: Coalescer[str, str, str] = Coalescer(fake.one, fake.many, max_outstanding=1)
    in_flight = asyncio.create_task(c.call("a", "a", "x"))
    queued = asyncio.create_task(c.call("a", "a", "y"))
    forgotten = asyncio.create_task(c.call("b", "b", "z"))
    forgotten_queued = asyncio.create_task(c.call("b", "b", "w"))
    await settle()
    c.forget("b")  # its actor was killed: the call in flight still owns its lane
    sends = list(c._tasks)
    assert fake.calls == [["x"], ["z"]] and len(sends) == 2
    await asyncio.wait_for(c.close(), 5)
    assert all(task.done() for task in sends) and not c._tasks
    for caller in (in_flight, queued, forgotten, forgotten_queued):
        with pytest.raises(asyncio.CancelledError):
            await caller
    assert fake.calls == [["x"], ["z"]]  # nothing sent after close
