"""A bridge logical worker (``bridge.worker.Slot``) registering with a scripted
fake queue manager: the ``workerid`` header, IDLE on registration, BIND/UNBIND
turned into WorkerStream calls and WorkerState reports in order, undecodable
instructions skipped, the end of the update stream. No network, no Ray."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, cast

import grpc.aio
import pytest

from ray_alpcrun import errors
from ray_alpcrun.bridge.answerbook import batch_key
from ray_alpcrun.bridge.session import Link, WorkerStream
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.bridge.stats import BridgeStats
from ray_alpcrun.bridge.worker import BridgeWorker, Slot
from ray_alpcrun.rpc import QueueStub
from ray_alpcrun.shared_data import SharedDataCache
from ray_alpcrun.transport import MD_POD, MD_SESSION_ID, MD_WORKER_ID
from ray_alpcrun.types import (
    Batch,
    Instruction,
    InstructionType,
    Message,
    WorkerState,
    WorkerStatus,
)

pytestmark = pytest.mark.timeout(60)
BIND, UNBIND = InstructionType.BIND, InstructionType.UNBIND
EOF_ = grpc.aio.EOF  # type: ignore[attr-defined]


class FakeCall:
    """One streaming call as grpc.aio hands it out: the test scripts what is read."""

    def __init__(self, metadata: Any, header: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = dict(metadata or ())
        self.header = header
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        self.written: asyncio.Queue[Any] = asyncio.Queue()
        self.half_closed = False
        self.cancelled = False

    async def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.header

    async def read(self) -> Any:
        return await self.incoming.get()

    async def write(self, message: Any) -> None:
        await self.written.put(message)

    async def done_writing(self) -> None:
        self.half_closed = True
        self.incoming.put_nowait(EOF_)  # the queue manager ends the stream in turn

    def cancel(self) -> bool:
        self.cancelled = True
        self.incoming.put_nowait(EOF_)
        return True


class FakeQueue:
    """``WorkerUpdate`` and ``WorkerStream`` of a scripted queue manager."""

    def __init__(self, worker_id: str = "W1") -> None:
        self.worker_id = worker_id
        self.update: FakeCall | None = None
        self.streams: list[FakeCall] = []

    def WorkerUpdate(self, metadata: Any = None) -> FakeCall:
        header = ((MD_WORKER_ID, self.worker_id),) if self.worker_id else ()
        self.update = FakeCall(metadata, header)
        return self.update

    def WorkerStream(self, metadata: Any = None) -> FakeCall:
        call = FakeCall(metadata)
        self.streams.append(call)
        return call


class NoCompute:
    async def share(self, session_id: str, level: int | None, payload: bytes) -> None:
        return None

    async def process(self, session_id: str, payloads: list[bytes], shared: Any) -> list[Any]:
        raise AssertionError("no task is sent in these tests")

    async def end_session(self, session_id: str) -> None:
        return None


def make_slot(queue: FakeQueue, compute: NoCompute | None = None) -> tuple[BridgeWorker, Slot]:
    settings = WorkerSettings(
        "127.0.0.1:1",
        "127.0.0.1:2",
        "key",
        "ghpc.v1",
        "node",
        "pod",
        1,
        drain_timeout_s=5.0,
        session_linger_s=0.0,
    )
    worker = BridgeWorker(settings, compute or NoCompute())
    worker.queue = cast(QueueStub, queue)

    async def no_fetch(session_id: str, level: int | None) -> Any:
        raise AssertionError("no shared data in these tests")

    worker.link = Link(
        queue=cast(QueueStub, queue),
        metadata=worker.base_metadata,
        shared=SharedDataCache(no_fetch, NoCompute().share),
        processor=worker.compute,  # as BridgeWorker._open wires it
        stats=BridgeStats(),
        max_message_bytes=1 << 20,
        give_back=worker.give_back,
    )
    return worker, worker.slots[0]


async def written(call: FakeCall) -> WorkerState:
    state = await asyncio.wait_for(call.written.get(), 5)
    assert isinstance(state, WorkerState)
    return state


async def test_registration_bind_unbind_and_the_end_of_the_update_stream() -> None:
    queue = FakeQueue("W1")
    worker, slot = make_slot(queue)
    serving = asyncio.create_task(slot.serve())
    await asyncio.wait_for(slot.registered.wait(), 5)
    update = cast(FakeCall, queue.update)
    assert update.metadata[MD_POD] == "pod"
    assert slot.worker_id == "W1" and slot.registrations == 1
    assert await written(update) == WorkerState("W1", WorkerStatus.IDLE, "")

    update.incoming.put_nowait(Instruction(BIND, "S1"))
    assert await written(update) == WorkerState("W1", WorkerStatus.BUSY, "S1")
    [stream] = queue.streams
    assert stream.metadata[MD_SESSION_ID] == "S1" and stream.metadata[MD_WORKER_ID] == "W1"
    assert worker.bound_sessions == ["S1"]

    update.incoming.put_nowait(None)  # a frame grpc could not decode
    update.incoming.put_nowait(Instruction(UNBIND, "S1"))
    assert await written(update) == WorkerState("W1", WorkerStatus.IDLE, "")
    assert stream.half_closed and slot.skipped_instructions == 1
    assert worker.bound_sessions == []

    update.incoming.put_nowait(EOF_)  # the queue manager ends the registration
    await asyncio.wait_for(serving, 5)
    assert not slot.registered.is_set() and update.cancelled
    assert update.written.empty()
    await asyncio.sleep(0.01)  # ok: the session's zero linger runs out
    assert worker.bound_sessions == []


async def test_the_end_of_the_update_stream_aborts_the_bound_session() -> None:
    queue = FakeQueue("W1")
    _, slot = make_slot(queue)
    serving = asyncio.create_task(slot.serve())
    await asyncio.wait_for(slot.registered.wait(), 5)
    update = cast(FakeCall, queue.update)
    assert (await written(update)).status == WorkerStatus.IDLE
    update.incoming.put_nowait(Instruction(BIND, "S1"))
    assert (await written(update)).status == WorkerStatus.BUSY
    update.incoming.put_nowait(EOF_)
    await asyncio.wait_for(serving, 5)
    # The registration is gone: the queue manager re-queues what was in flight,
    # so the stream is cancelled rather than drained, and no IDLE is sent.
    assert queue.streams[0].cancelled and not queue.streams[0].half_closed
    assert update.written.empty() and slot.session is None


async def test_a_registration_without_a_worker_id_header_is_a_protocol_error() -> None:
    queue = FakeQueue("")
    _, slot = make_slot(queue)
    update_ready = asyncio.create_task(slot.serve())
    await asyncio.sleep(0)  # ok: serve() opened the call
    cast(FakeCall, queue.update).incoming.put_nowait(EOF_)
    with pytest.raises(errors.ProtocolError, match=MD_WORKER_ID):
        await asyncio.wait_for(update_ready, 5)
    assert not slot.registered.is_set()


class SlowEnd(NoCompute):
    """An end that queues behind sub-batches still running on the actors."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.end_started = asyncio.Event()
        self.end_gate = asyncio.Event()

    async def process(self, session_id: str, payloads: list[bytes], shared: Any) -> list[Any]:
        self.log.append(f"process {session_id}")
        return [(p, None) for p in payloads]

    async def end_session(self, session_id: str) -> None:
        self.log.append(f"end {session_id}")
        self.end_started.set()
        await self.end_gate.wait()
        self.log.append(f"end {session_id} done")


async def test_a_session_bound_again_while_its_end_runs_is_served_after_the_end() -> None:
    # Issue 18 item 4: the linger entry is gone once the end started, so the BIND
    # found nothing to cancel and the end cleared the state of a served session.
    queue = FakeQueue("W1")
    compute = SlowEnd()
    worker, slot = make_slot(queue, compute)
    serving = asyncio.create_task(slot.serve())
    try:
        await asyncio.wait_for(slot.registered.wait(), 5)
        update = cast(FakeCall, queue.update)
        assert (await written(update)).status == WorkerStatus.IDLE
        update.incoming.put_nowait(Instruction(BIND, "S1"))
        assert (await written(update)).status == WorkerStatus.BUSY
        update.incoming.put_nowait(Instruction(UNBIND, "S1"))
        assert (await written(update)).status == WorkerStatus.IDLE
        await asyncio.wait_for(compute.end_started.wait(), 5)  # zero linger: the end is sent
        update.incoming.put_nowait(Instruction(BIND, "S1"))
        assert (await written(update)).status == WorkerStatus.BUSY
        stream = queue.streams[1]
        stream.incoming.put_nowait(Batch(id="b1", session_id="S1", messages=[Message("t1", b"x")]))
        for _ in range(100):  # the batch started (and, without the fix, ran at once)
            if worker.link.stats.batches_in_flight or worker.link.stats.batches_done:
                break
            await asyncio.sleep(0)  # ok: bounded poll; yields until the reader took the batch
        assert compute.log == ["end S1"], compute.log  # the batch waits for the end
        compute.end_gate.set()
        answer = await asyncio.wait_for(stream.written.get(), 5)
        assert isinstance(answer, Batch) and answer.messages[0].payload == b"x"
        assert compute.log == ["end S1", "end S1 done", "process S1"]
        assert worker.bound_sessions == ["S1"]
    finally:
        compute.end_gate.set()
        cast(FakeCall, queue.update).incoming.put_nowait(EOF_)
        await asyncio.wait_for(serving, 5)


async def test_pause_drains_and_unregisters_and_resume_registers_again() -> None:
    # The bridge stops taking work while its pool has given up for now (issue 18):
    # the session is drained like an UNBIND (IDLE reported), the registration
    # ends, none is made while paused, and resume() registers again.
    queue = FakeQueue("W1")
    worker, slot = make_slot(queue)
    looping = asyncio.create_task(worker._slot_loop(slot))
    await asyncio.wait_for(slot.registered.wait(), 5)
    first = cast(FakeCall, queue.update)
    assert (await written(first)).status == WorkerStatus.IDLE
    first.incoming.put_nowait(Instruction(BIND, "S1"))
    assert (await written(first)).status == WorkerStatus.BUSY
    worker.pause("no live actor for 61 s")
    assert await written(first) == WorkerState("W1", WorkerStatus.IDLE, "")
    await asyncio.wait_for(asyncio.gather(*worker._pausing), 5)
    assert first.half_closed and queue.streams[0].half_closed
    assert not slot.registered.is_set() and worker.paused == "no live actor for 61 s"
    assert queue.update is first  # no registration while paused
    worker.resume()
    await asyncio.wait_for(slot.registered.wait(), 5)
    assert queue.update is not first and slot.registrations == 2
    assert worker.reconnects == 0  # ended on purpose: not a lost connection
    await worker.stop(drain=False)
    await asyncio.wait_for(looping, 5)


class NoPool(NoCompute):
    async def process(self, session_id: str, payloads: list[bytes], shared: Any) -> list[Any]:
        raise errors.PoolUnavailable("no live actor for 61.0 s (more than 60 s)")


async def test_a_batch_held_while_the_pool_gave_up_is_answered_dead_with_the_reason() -> None:
    worker, _ = make_slot(FakeQueue("W1"))
    link = replace(worker.link, processor=NoPool())
    stream = WorkerStream(link, "S1", "W1", "pod")
    task = Batch("b1", "S1", messages=[Message("m1", b"x"), Message("m2", b"y")])
    (answer,) = await stream._answer(task, batch_key("S1", task))
    assert answer.dead
    assert [m.error for m in answer.messages] == ["no live actor for 61.0 s (more than 60 s)"] * 2


class Hangs(NoCompute):
    async def process(self, session_id: str, payloads: list[bytes], shared: Any) -> list[Any]:
        await asyncio.Event().wait()  # no actor will ever run it
        raise AssertionError("unreachable")


async def test_a_drain_gives_back_at_once_what_nothing_here_can_run() -> None:
    # CI chaos run, 2026-12-07: a node the shrinking pool had left kept a logical
    # worker; its batches waited for an actor that would not come, and the drain
    # that stopped the node bridge waited out its whole timeout (the run stalled).
    worker, _ = make_slot(FakeQueue("W1"))
    stream = WorkerStream(replace(worker.link, processor=Hangs()), "S1", "W1", "pod")
    stream.start()
    call = worker.link.queue.streams[0]  # type: ignore[attr-defined]
    call.incoming.put_nowait(Batch("b1", "S1", messages=[Message("m1", b"x")]))
    for _ in range(100):
        if stream.in_flight:
            break
        await asyncio.sleep(0.01)  # ok: polls for the batch to be taken
    draining = asyncio.create_task(stream.drain(timeout_s=30))
    await asyncio.sleep(0.2)  # ok: the drain waits for the batch while it may still run
    assert not draining.done()
    worker.give_back.set()
    assert await asyncio.wait_for(draining, 5) is False
    assert call.half_closed and call.written.empty()  # unanswered: re-delivered elsewhere
    assert stream.in_flight == 0


async def test_a_slot_added_while_the_worker_starts_has_one_registration_loop() -> None:
    # A node bridge is handed its actors while its worker waits for the node
    # cache: resize() started a loop for each new slot, then run() started one
    # more for every slot. Two loops shared one Slot: the queue manager saw the
    # same pod registered twice (7 workers for 4 actors in the scale-out run).
    worker, _ = make_slot(FakeQueue())
    waiting, cache, stop, three = (asyncio.Event() for _ in range(4))
    loops: list[int] = []

    async def wait_for_cache() -> None:
        waiting.set()
        await cache.wait()

    async def slot_loop(slot: Slot) -> None:
        loops.append(slot.index)
        if len(loops) >= 3:
            three.set()
        await stop.wait()

    worker.wait_for_cache = wait_for_cache  # type: ignore[method-assign]
    worker._slot_loop = slot_loop  # type: ignore[method-assign]
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(waiting.wait(), 5)
    worker.resize(3)  # the node bridge's actors arrive
    cache.set()
    await asyncio.wait_for(three.wait(), 5)
    for _ in range(20):  # a second loop per slot would have started by now
        await asyncio.sleep(0)  # ok: yields to the loop, waits for nothing
    assert sorted(loops) == [0, 1, 2]
    stop.set()
    await asyncio.wait_for(running, 5)
