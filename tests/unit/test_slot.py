"""The slot state machine (``ray_alpcrun.slot``) against a scripted fake queue
manager: the sequences of issue 10 item 1, applied strictly in order. No gRPC,
no Ray."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from ray_alpcrun.slot import SlotMachine
from ray_alpcrun.types import Instruction, InstructionType, WorkerStatus

pytestmark = pytest.mark.timeout(60)
BIND, UNBIND = InstructionType.BIND, InstructionType.UNBIND
IDLE, BUSY = WorkerStatus.IDLE, WorkerStatus.BUSY


class FakeStream:
    """A WorkerStream as the slot sees it; the test decides when a drain finishes."""

    def __init__(self, log: list[str], session_id: str, number: int) -> None:
        self.log = log
        self.session_id = session_id
        self.name = f"{session_id}#{number}"
        self.closed = asyncio.Event()
        self.in_flight_done = asyncio.Event()
        self.in_flight_done.set()
        self.draining = asyncio.Event()

    async def drain(self, timeout_s: float | None) -> None:
        self.log.append(f"drain {self.name}")
        self.draining.set()
        done = asyncio.ensure_future(self.in_flight_done.wait())
        closed = asyncio.ensure_future(self.closed.wait())
        await asyncio.wait({done, closed}, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        closed.cancel()
        self.log.append(f"half-closed {self.name}")
        self.closed.set()

    async def abort(self) -> None:
        if not self.closed.is_set():
            self.log.append(f"abort {self.name}")
        self.closed.set()


class Harness:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.streams: list[FakeStream] = []
        self.released: list[str] = []  # sessions the slot stopped serving (bridge bookkeeping)
        self.machine = SlotMachine(self.open, self.report, self.released.append, name="W1")
        self.reported = asyncio.Queue[tuple[WorkerStatus, str]]()

    def open(self, session_id: str) -> FakeStream:
        stream = FakeStream(self.log, session_id, len(self.streams))
        self.streams.append(stream)
        self.log.append(f"open {stream.name}")
        return stream

    async def report(self, status: WorkerStatus, session_id: str) -> None:
        self.log.append(f"{status.name} {session_id}".strip())
        await self.reported.put((status, session_id))

    def send(self, kind: InstructionType | int, session_id: str) -> None:
        self.machine.instruct(Instruction(kind, session_id))

    async def state(self) -> tuple[WorkerStatus, str]:
        return await asyncio.wait_for(self.reported.get(), 5)


async def _with_machine(script: Any) -> list[str]:
    h = Harness()
    runner = asyncio.create_task(h.machine.run())
    try:
        await script(h)
        held = h.machine.current is not None
        await h.machine.stop(1.0)
        if held:  # a graceful stop drains the stream held and says IDLE
            assert await h.state() == (IDLE, "")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await h.machine.close()
    assert h.reported.empty(), h.log
    return h.log


async def test_abort_then_bind_before_the_slot_noticed() -> None:
    async def script(h: Harness) -> None:
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.streams[0].in_flight_done.clear()  # a batch in flight
        # The queue manager aborts the stream and re-binds at once: the BIND is
        # applied while the slot still believes the stream healthy...
        h.send(BIND, "A")
        await asyncio.sleep(0.05)  # ok: let the machine start on the BIND
        assert h.log[-1] == "drain A#0" and len(h.streams) == 1
        h.streams[0].closed.set()  # ...then the break arrives: no waiting for the batch
        assert await h.state() == (BUSY, "A")
        assert len(h.streams) == 2 and not h.streams[1].closed.is_set()

    log = await _with_machine(script)
    assert log[:6] == ["open A#0", "BUSY A", "drain A#0", "half-closed A#0", "open A#1", "BUSY A"]


async def test_abort_noticed_then_bind() -> None:
    async def script(h: Harness) -> None:
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.streams[0].closed.set()
        for _ in range(100):  # the slot frees itself (a queued event), reporting nothing
            if h.machine.current is None:
                break
            await asyncio.sleep(0.01)  # ok: bounded poll; the machine frees itself silently
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")

    log = await _with_machine(script)
    assert log[:4] == ["open A#0", "BUSY A", "open A#1", "BUSY A"], log


async def test_unbind_then_bind_with_slow_work_in_flight() -> None:
    async def script(h: Harness) -> None:
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.streams[0].in_flight_done.clear()  # a slow batch
        h.send(UNBIND, "A")
        h.send(BIND, "A")
        await asyncio.sleep(0.05)  # ok: both instructions are in; nothing may overtake the drain
        assert len(h.streams) == 1 and h.machine.pending == 1
        h.streams[0].in_flight_done.set()
        assert await h.state() == (IDLE, "")
        assert await h.state() == (BUSY, "A")

    log = await _with_machine(script)
    assert log[:6] == ["open A#0", "BUSY A", "drain A#0", "half-closed A#0", "IDLE", "open A#1"]


async def test_bind_twice_with_a_healthy_stream() -> None:
    async def script(h: Harness) -> None:
        h.send(BIND, "A")
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        assert await h.state() == (BUSY, "A")

    log = await _with_machine(script)
    # A fresh stream, opened only after the previous one ended; no IDLE between.
    assert log[:5] == ["open A#0", "BUSY A", "drain A#0", "half-closed A#0", "open A#1"], log


async def test_server_ended_stream_then_unbind_reports_idle_once() -> None:
    async def script(h: Harness) -> None:
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.streams[0].closed.set()  # the queue manager ended the stream
        h.send(UNBIND, "A")
        assert await h.state() == (IDLE, "")

    log = await _with_machine(script)
    assert log.count("IDLE") == 1, log


async def test_unknown_types_and_foreign_unbinds_are_skipped() -> None:
    async def script(h: Harness) -> None:
        h.send(7, "A")
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.send(UNBIND, "B")  # not ours: skipped, A keeps its stream
        h.send(UNBIND, "A")
        assert await h.state() == (IDLE, "")
        assert h.machine.skipped == 1

    log = await _with_machine(script)
    assert log == ["open A#0", "BUSY A", "drain A#0", "half-closed A#0", "IDLE"], log


async def test_a_stop_pending_when_the_registration_ends_returns() -> None:
    h = Harness()
    h.send(BIND, "A")  # never applied: no runner
    stopping = asyncio.create_task(h.machine.stop(1.0))
    await asyncio.sleep(0)  # ok: the stop is queued
    await h.machine.close()
    await asyncio.wait_for(stopping, 5)
    await asyncio.wait_for(h.machine.stop(1.0), 5)  # after close: returns at once


# -- BIND/UNBIND queueing, stream end and drain, as the bridge relies on them --------


async def test_bind_to_another_session_drains_the_first_without_idle() -> None:
    seen: list[Harness] = []

    async def script(h: Harness) -> None:
        seen.append(h)
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.send(BIND, "B")
        assert await h.state() == (BUSY, "B")
        assert h.released == ["A"] and h.machine.session_id == "B"

    log = await _with_machine(script)
    assert log[:5] == ["open A#0", "BUSY A", "drain A#0", "half-closed A#0", "open B#1"], log
    assert "IDLE" not in log[:6]
    assert seen[0].released == ["A", "B"]  # the graceful stop released B too


async def test_unbind_with_nothing_held_reports_idle() -> None:
    async def script(h: Harness) -> None:
        h.send(UNBIND, "A")
        assert await h.state() == (IDLE, "")
        assert h.machine.applied == 1

    assert await _with_machine(script) == ["IDLE"]


async def test_instructions_wait_for_the_drain_in_order() -> None:
    async def script(h: Harness) -> None:
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.streams[0].in_flight_done.clear()  # a slow batch holds the drain
        h.send(UNBIND, "A")
        h.send(BIND, "B")
        h.send(UNBIND, "B")
        await asyncio.sleep(0.05)  # ok: give the machine the chance to overtake (it must not)
        assert h.machine.pending == 2 and len(h.streams) == 1
        h.streams[0].in_flight_done.set()
        assert [await h.state() for _ in range(3)] == [(IDLE, ""), (BUSY, "B"), (IDLE, "")]

    log = await _with_machine(script)
    assert log == [
        "open A#0", "BUSY A", "drain A#0", "half-closed A#0", "IDLE",
        "open B#1", "BUSY B", "drain B#1", "half-closed B#1", "IDLE",
    ]  # fmt: skip


async def test_stop_drains_the_batch_in_flight_then_reports_idle_and_applies_no_more() -> None:
    h = Harness()
    runner = asyncio.create_task(h.machine.run())
    try:
        h.send(BIND, "A")
        assert await h.state() == (BUSY, "A")
        h.streams[0].in_flight_done.clear()
        stopping = asyncio.create_task(h.machine.stop(5.0))
        await asyncio.sleep(0.05)  # ok: the stop is waiting on the batch
        assert not stopping.done() and h.log[-1] == "drain A#0"
        h.streams[0].in_flight_done.set()
        await asyncio.wait_for(stopping, 5)
        assert await h.state() == (IDLE, "")
        h.send(BIND, "B")  # after stop: skipped, no stream opened
        await asyncio.sleep(0.05)  # ok: let the machine see it
        assert len(h.streams) == 1 and h.reported.empty()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await h.machine.close()
    assert h.log == ["open A#0", "BUSY A", "drain A#0", "half-closed A#0", "IDLE"]


async def test_close_aborts_the_stream_held_and_releases_its_session() -> None:
    h = Harness()
    runner = asyncio.create_task(h.machine.run())
    h.send(BIND, "A")
    assert await h.state() == (BUSY, "A")
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await h.machine.close()  # the registration is gone: no drain, no IDLE
    assert h.log == ["open A#0", "BUSY A", "abort A#0"]
    assert h.released == ["A"] and h.reported.empty()


@pytest.mark.parametrize("how", ["unbind", "bind", "stop"])
async def test_a_drain_cut_short_aborts_the_stream_and_releases_its_session(how: str) -> None:
    # The registration is lost (or the slot retired) while a drain waits on a batch:
    # the runner is cancelled mid-drain, then closed. Nothing may stay behind.
    h = Harness()
    runner = asyncio.create_task(h.machine.run())
    stopping: asyncio.Task[None] | None = None
    h.send(BIND, "A")
    assert await h.state() == (BUSY, "A")
    h.streams[0].in_flight_done.clear()  # a batch in flight holds the drain
    if how == "stop":
        stopping = asyncio.create_task(h.machine.stop(30.0))
    else:
        h.send(UNBIND if how == "unbind" else BIND, "A")
    await asyncio.wait_for(h.streams[0].draining.wait(), 5)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await h.machine.close()
    if stopping is not None:
        await asyncio.wait_for(stopping, 5)
    assert h.log == ["open A#0", "BUSY A", "drain A#0", "abort A#0"], h.log
    assert h.released == ["A"] and h.machine.current is None
    assert h.reported.empty()  # cut short: no IDLE, no second BUSY


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_an_instruction_after_stop_is_logged_by_its_name() -> None:
    """Its type as the protocol names it (``UNBIND``), not ``type=1``."""
    h = Harness()
    seen = Records()
    logger = logging.getLogger("ray_alpcrun.slot")
    logger.addHandler(seen)
    level = logger.level
    logger.setLevel(logging.INFO)
    runner = asyncio.create_task(h.machine.run())
    try:
        await h.machine.stop(1.0)
        h.send(UNBIND, "A")
        await h.machine.stop(1.0)  # queued after the UNBIND: returns once it was seen
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await h.machine.close()
    (record,) = [r for r in seen.records if r.getMessage() == "instruction after stop skipped"]
    assert record.alpcrun_fields == {"worker": "W1", "type": "UNBIND", "session": "A"}
