"""The bridge CLI against a scripted queue manager written from section 5.3 alone.

The fake below uses only grpcio and the generated messages — none of the
project's devserver, transport or wire code — and drives
``python -m ray_alpcrun.bridge`` (a subprocess with its own Ray) through
registration, BIND, two shared-data levels, a stream dropped mid-batch, a
re-BIND with re-delivery, UNBIND and a final SIGTERM, counting every answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from ray_alpcrun._proto import ghpc_pb2 as pb  # the independent side speaks raw protobuf

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parent.parent
KEY = "independent-key-0123456789"
STEP_S = 60.0


class FakeQueue:
    def __init__(self) -> None:
        self.registrations: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.states: dict[str, asyncio.Queue[Any]] = {}
        self.instructions: dict[str, asyncio.Queue[Any]] = {}
        self.streams: asyncio.Queue[tuple[dict[str, str], Any, Any]] = asyncio.Queue()
        self.updates_closed: list[str] = []
        self.count = 0

    def _check(self, md: dict[str, str]) -> None:
        assert md.get("api_key") == KEY and md.get("node") and md.get("pod"), md

    async def WorkerUpdate(self, requests: Any, context: Any) -> Any:
        md = dict(context.invocation_metadata())
        self._check(md)
        self.count += 1
        worker_id = f"W{self.count}"
        self.states[worker_id] = asyncio.Queue()
        self.instructions[worker_id] = asyncio.Queue()
        await context.send_initial_metadata((("workerid", worker_id),))
        await self.registrations.put((worker_id, md))

        async def read_states() -> None:
            async for state in requests:
                await self.states[worker_id].put(state)
            self.updates_closed.append(worker_id)

        reader = asyncio.ensure_future(read_states())
        try:
            while True:
                get = asyncio.ensure_future(self.instructions[worker_id].get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return
                yield get.result()
        finally:
            reader.cancel()

    async def WorkerStream(self, requests: Any, context: Any) -> Any:
        md = dict(context.invocation_metadata())
        self._check(md)
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        await self.streams.put((md, outbox, inbox))

        async def read_results() -> None:
            async for batch in requests:
                await inbox.put(batch)
            await inbox.put(None)  # half-closed by the worker

        reader = asyncio.ensure_future(read_results())
        try:
            while True:
                item = await outbox.get()
                if item == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
                if item == "end":
                    return
                yield item
        finally:
            reader.cancel()


class FakeCache:
    levels = {1: b"LEVEL-ONE", 2: b"LEVEL-TWO"}
    gets: list[int] = []

    async def GetSharedData(self, request: Any, context: Any) -> Any:
        assert dict(context.invocation_metadata()).get("api_key") == KEY
        if not request.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is required")
        level = request.update_level if request.HasField("update_level") else 2
        self.gets.append(level)
        if level not in self.levels:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no level {level}")
        return pb.SharedData(session_id=request.session_id, update_level=level,
                             payload=self.levels[level])  # fmt: skip

    async def SetSharedData(self, request: Any, context: Any) -> Any:
        return pb.Status()


def _handlers(package: str, queue: FakeQueue, cache: FakeCache) -> list[Any]:
    prefix = f"{package}." if package else ""
    ser = {
        "Batch": (pb.Batch.FromString, pb.Batch.SerializeToString),
        "WorkerState": (pb.WorkerState.FromString, None),
        "Instruction": (None, pb.Instruction.SerializeToString),
    }
    q = grpc.method_handlers_generic_handler(f"{prefix}Queue", {
        "WorkerUpdate": grpc.stream_stream_rpc_method_handler(
            queue.WorkerUpdate, ser["WorkerState"][0], ser["Instruction"][1]),
        "WorkerStream": grpc.stream_stream_rpc_method_handler(
            queue.WorkerStream, ser["Batch"][0], ser["Batch"][1]),
    })  # fmt: skip
    c = grpc.method_handlers_generic_handler(f"{prefix}Cache", {
        "GetSharedData": grpc.unary_unary_rpc_method_handler(
            cache.GetSharedData, pb.SharedData.FromString, pb.SharedData.SerializeToString),
    })  # fmt: skip
    return [q, c]


def _batch(batch_id: str, session: str, n: int, level: int) -> Any:
    b = pb.Batch(id=batch_id, session_id=session, use_shared_data=True,
                 required_shared_data_update_level=level)  # fmt: skip
    for i in range(n):
        b.messages.add(id=f"{batch_id}-{i}", payload=f"{batch_id}:{i}".encode())
    return b


async def _scenario(package: str) -> None:
    queue, cache = FakeQueue(), FakeCache()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(_handlers(package, queue, cache))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = {**os.environ, "METALCORE_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    env.pop("METALCORE_WORKER_NODE", None)
    cmd = [sys.executable, "-m", "ray_alpcrun.bridge", "--queue", f"127.0.0.1:{port}",
           "--cache", f"127.0.0.1:{port}", "--proto-package", package,
           "--handler", "tests.bridge_handlers:echo", "--actors", "2", "--cpus-per-actor", "0.5",
           "--drain-timeout", "20", "--log-level", "info"]  # fmt: skip
    # A file, not a pipe: a full pipe would stall the bridge. Closed in the finally below.
    log_file = tempfile.TemporaryFile("w+")  # noqa: SIM115
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen only starts it; waits go through a thread
        cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True
    )
    answers: Counter[str] = Counter()
    payloads: dict[str, bytes] = {}

    async def wait(q: asyncio.Queue[Any]) -> Any:
        return await asyncio.wait_for(q.get(), STEP_S)

    async def collect(inbox: asyncio.Queue[Any], batch: Any) -> Any:
        result = await wait(inbox)
        assert result is not None and result.id == batch.id
        assert result.session_id == batch.session_id and not result.dead
        for m in result.messages:
            assert m.related_id == m.id
            answers[m.id] += 1
            payloads[m.id] = m.payload
        return result

    try:
        # Registration: two slots (one per actor), each reads its workerid and says IDLE.
        workers = [await wait(queue.registrations) for _ in range(2)]
        assert {md["node"] for _, md in workers} and len({md["pod"] for _, md in workers}) == 2
        for worker_id, _ in workers:
            state = await wait(queue.states[worker_id])
            assert (state.worker_id, state.status) == (worker_id, pb.WorkerState.IDLE)
        wid = workers[0][0]

        # BIND -> a WorkerStream with sessionid; BUSY reported.
        await queue.instructions[wid].put(pb.Instruction(type=pb.Instruction.BIND, session_id="S1"))
        md, outbox, inbox = await wait(queue.streams)
        assert md["sessionid"] == "S1"
        assert (await wait(queue.states[wid])).status == pb.WorkerState.BUSY

        # Two shared-data levels.
        b1, b2 = _batch("b1", "S1", 20, 1), _batch("b2", "S1", 20, 2)
        await outbox.put(b1)
        await collect(inbox, b1)
        await outbox.put(b2)
        await collect(inbox, b2)
        assert payloads["b1-3"] == b"b1:3|LEVEL-ONE" and payloads["b2-3"] == b"b2:3|LEVEL-TWO"

        # A stream dropped mid-batch: no answer may arrive for b3 on it.
        b3 = _batch("b3", "S1", 20, 2)
        await outbox.put(b3)
        await outbox.put("abort")
        assert (await wait(queue.states[wid])).status == pb.WorkerState.IDLE
        # Re-BIND, re-deliver b3 on the new stream: answered exactly once.
        await queue.instructions[wid].put(pb.Instruction(type=pb.Instruction.BIND, session_id="S1"))
        md, outbox, inbox = await wait(queue.streams)
        assert md["sessionid"] == "S1"
        assert (await wait(queue.states[wid])).status == pb.WorkerState.BUSY
        await outbox.put(b3)
        await collect(inbox, b3)

        # UNBIND: the worker half-closes its stream and reports IDLE.
        await queue.instructions[wid].put(
            pb.Instruction(type=pb.Instruction.UNBIND, session_id="S1")
        )
        assert await wait(inbox) is None
        await outbox.put("end")
        assert (await wait(queue.states[wid])).status == pb.WorkerState.IDLE

        # SIGTERM: clean exit 0, registrations half-closed.
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), STEP_S)
        log_file.seek(0)
        output = log_file.read()
        assert code == 0, output
        assert sorted(queue.updates_closed) == sorted(w for w, _ in workers), output
        assert KEY not in output
        assert set(answers) == {f"{b}-{i}" for b in ("b1", "b2", "b3") for i in range(20)}
        assert set(answers.values()) == {1}, "a task was answered twice"
        assert sorted(set(cache.gets)) == [1, 2] and len(cache.gets) == 2  # once per level
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await server.stop(None)
        log_file.close()


@pytest.mark.parametrize("package", ["ghpc.v1", "metalcore.api.v1"])
def test_bridge_cli_against_an_independent_queue_manager(package: str) -> None:
    FakeCache.gets = []
    asyncio.run(_scenario(package))
