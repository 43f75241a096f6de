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
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from ray_alpcrun._proto import ghpc_pb2 as pb  # the independent side speaks raw protobuf

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
KEY = "independent-key-0123456789"
STEP_S = 60.0


class FakeQueue:
    def __init__(self) -> None:
        self.registrations: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.states: dict[str, asyncio.Queue[Any]] = {}
        self.instructions: dict[str, asyncio.Queue[Any]] = {}
        self.streams: asyncio.Queue[tuple[dict[str, str], Any, Any]] = asyncio.Queue()
        self.updates_closed: list[str] = []
        self.stream_log: list[tuple[str, int]] = []  # ("open"|"closed", stream number)
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
        number = sum(1 for kind, _ in self.stream_log if kind == "open")
        self.stream_log.append(("open", number))
        md["stream"] = str(number)
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
            self.stream_log.append(("closed", number))
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

    def raw(msg: Any) -> bytes:  # bytes pass as they are: frames the worker cannot decode
        return msg if isinstance(msg, bytes) else bytes(msg.SerializeToString())

    ser = {
        "Batch": (pb.Batch.FromString, raw),
        "WorkerState": (pb.WorkerState.FromString, None),
        "Instruction": (None, raw),
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


def _batch(batch_id: str, session: str, n: int, level: int | None, gate: Path | None = None) -> Any:
    b = pb.Batch(id=batch_id, session_id=session)
    if level is not None:
        b.use_shared_data = True
        b.required_shared_data_update_level = level
    for i in range(n):
        text = f"{batch_id}:{i}"
        payload = f"gate:{gate}:{text}" if gate is not None and i == 0 else text
        b.messages.add(id=f"{batch_id}-{i}", payload=payload.encode())
    return b


class Bridge:
    """``python -m ray_alpcrun.bridge`` (its own Ray), two slots."""

    slots = 2

    def __init__(self, port: int, package: str) -> None:
        env = {**os.environ, "METALCORE_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
        env.pop("METALCORE_WORKER_NODE", None)
        cmd = [sys.executable, "-m", "ray_alpcrun.bridge", "--queue", f"127.0.0.1:{port}",
               "--cache", f"127.0.0.1:{port}", "--proto-package", package,
               "--handler", "tests.support.bridge_handlers:gated", "--actors", "2",
               "--cpus-per-actor", "0.5", "--drain-timeout", "20",
               "--log-level", "info"]  # fmt: skip
        # A file, not a pipe: a full pipe would stall the bridge. Closed in close().
        self.log_file = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, text=True
        )

    async def stop(self) -> str:
        """SIGTERM: a clean exit 0. Returns the log."""
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), STEP_S)
        self.log_file.seek(0)
        output = self.log_file.read()
        assert code == 0, output
        assert KEY not in output
        return output

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


class RefWorker:
    """The reference worker, in a thread of this process."""

    slots = 1

    def __init__(self, port: int, package: str) -> None:
        from ray_alpcrun.config import ServiceConfig, WorkerIdentity
        from ray_alpcrun.refworker import ReferenceWorkerConfig, start_in_thread

        service = ServiceConfig(
            queue_address=f"127.0.0.1:{port}", cache_address=f"127.0.0.1:{port}",
            api_key=KEY, proto_package=package,
        )  # fmt: skip
        config = ReferenceWorkerConfig(
            service=service, identity=WorkerIdentity(node="n1", pod="p1"), drain_timeout_s=20.0
        )
        self.thread = start_in_thread(config, "tests.support.bridge_handlers:gated")

    async def stop(self) -> str:
        await asyncio.to_thread(self.thread.stop, STEP_S)
        return ""

    def close(self) -> None:
        self.thread.kill()


async def _scenario(package: str, make: type[Bridge | RefWorker], tmp: Path) -> None:
    queue, cache = FakeQueue(), FakeCache()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(_handlers(package, queue, cache))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    worker = make(port, package)
    answers: Counter[str] = Counter()
    payloads: dict[str, bytes] = {}

    async def wait(q: asyncio.Queue[Any]) -> Any:
        return await asyncio.wait_for(q.get(), STEP_S)

    async def collect(inbox: asyncio.Queue[Any], batch: Any) -> Any:
        result = await wait(inbox)
        assert result is not None and result.id == batch.id
        assert result.session_id == batch.session_id and not result.dead
        for m in result.messages:
            assert m.related_id == m.id and not m.HasField("error"), m
            answers[m.id] += 1
            payloads[m.id] = m.payload
        return result

    async def state(wid: str) -> tuple[int, str]:
        got = await wait(queue.states[wid])
        return got.status, got.session_id

    async def until_exists(path: Path) -> None:
        # The handler runs in another process: watch for its mark (bounded).
        def poll() -> None:
            deadline = time.monotonic() + STEP_S
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # ok: bounded poll for a file another process writes
            assert path.exists(), f"{path} never appeared"

        await asyncio.to_thread(poll)

    BIND, UNBIND = pb.Instruction.BIND, pb.Instruction.UNBIND
    IDLE, BUSY = pb.WorkerState.IDLE, pb.WorkerState.BUSY
    try:
        # Registration: each slot reads its workerid and says IDLE.
        workers = [await wait(queue.registrations) for _ in range(make.slots)]
        assert len({md["pod"] for _, md in workers}) == make.slots
        for worker_id, _ in workers:
            assert (await state(worker_id))[0] == IDLE
        wid = workers[0][0]
        instruct = queue.instructions[wid].put

        # Frames we do not know are skipped: an unknown instruction type, bytes that
        # are no Instruction at all. The registration must survive both.
        await instruct(pb.Instruction(type=7, session_id="S1"))  # type: ignore[arg-type]
        await instruct(b"\xff\xff\xff")
        await instruct(pb.Instruction(type=BIND, session_id="S1"))
        md, outbox, inbox = await wait(queue.streams)
        assert md["sessionid"] == "S1"
        assert await state(wid) == (BUSY, "S1")

        # An undecodable task batch is skipped; the stream carries on.
        await outbox.put(b"\xff\xff\xff")
        b1, b2 = _batch("b1", "S1", 20, 1), _batch("b2", "S1", 20, 2)
        await outbox.put(b1)
        await collect(inbox, b1)
        await outbox.put(b2)
        await collect(inbox, b2)
        assert payloads["b1-3"] == b"b1:3|LEVEL-ONE" and payloads["b2-3"] == b"b2:3|LEVEL-TWO"

        # The queue manager aborts the stream with b3 in flight and re-binds at once:
        # the BIND may arrive before the worker noticed the abort, and must not be lost.
        gate3 = tmp / "g3"
        gate3.mkdir()
        b3 = _batch("b3", "S1", 20, 2, gate=gate3)
        await outbox.put(b3)
        await until_exists(gate3 / "started")
        await outbox.put("abort")
        await instruct(pb.Instruction(type=BIND, session_id="S1"))
        md, outbox, inbox = await wait(queue.streams)
        assert md["sessionid"] == "S1"
        assert await state(wid) == (BUSY, "S1")
        (gate3 / "open").touch()
        await outbox.put(b3)  # re-delivered on the new stream: answered there, once
        await collect(inbox, b3)

        # UNBIND then BIND with b4 in flight: b4 is answered on its stream, which the
        # worker half-closes; IDLE once; then a new stream for the BIND, BUSY.
        gate4 = tmp / "g4"
        gate4.mkdir()
        b4 = _batch("b4", "S1", 20, None, gate=gate4)
        await outbox.put(b4)
        await until_exists(gate4 / "started")
        await instruct(pb.Instruction(type=UNBIND, session_id="S1"))
        await instruct(pb.Instruction(type=BIND, session_id="S1"))
        # Give both instructions time to reach the worker while b4 is held (the bug
        # this guards against dropped the BIND during the drain).
        await asyncio.sleep(0.5)  # ok: the worker has no hook to say an instruction arrived
        (gate4 / "open").touch()
        old_number = md["stream"]
        await collect(inbox, b4)
        assert await wait(inbox) is None  # half-closed after the answer
        await outbox.put("end")
        assert await state(wid) == (IDLE, "")
        md, outbox, inbox = await wait(queue.streams)
        assert md["sessionid"] == "S1"
        assert queue.stream_log.index(("closed", int(old_number))) < queue.stream_log.index(
            ("open", int(md["stream"]))
        ), queue.stream_log
        assert await state(wid) == (BUSY, "S1")
        b5 = _batch("b5", "S1", 20, 1)
        await outbox.put(b5)
        await collect(inbox, b5)

        # A result over the 4 MiB default limit is that task's error; the rest arrive.
        b6 = _batch("b6", "S1", 3, None)
        b6.messages[1].payload = b"big:%d" % (5 << 20)
        await outbox.put(b6)
        result = await wait(inbox)
        assert result.id == "b6" and not result.dead
        big = result.messages[1]
        assert big.id == big.related_id == "b6-1" and "too large" in big.error, big
        assert [m.payload for m in result.messages] == [b"b6:0", b"", b"b6:2"]

        # UNBIND: half-close, IDLE once.
        await instruct(pb.Instruction(type=UNBIND, session_id="S1"))
        assert await wait(inbox) is None
        await outbox.put("end")
        assert await state(wid) == (IDLE, "")

        await worker.stop()
        assert sorted(queue.updates_closed) == sorted(w for w, _ in workers)
        assert queue.states[wid].empty(), "a state reported twice"
        expected = {f"{b}-{i}" for b in ("b1", "b2", "b3", "b4", "b5") for i in range(20)}
        assert set(answers) == expected
        assert set(answers.values()) == {1}, "a task was answered twice"
        assert payloads["b4-0"] == b"b4:0" and payloads["b4-1"] == b"b4:1"  # no shared data
    finally:
        worker.close()
        await server.stop(None)


@pytest.mark.parametrize("package", ["ghpc.v1", "metalcore.api.v1"])
@pytest.mark.parametrize("make", [Bridge, RefWorker], ids=["bridge", "refworker"])
def test_worker_against_an_independent_queue_manager(
    package: str, make: type[Bridge | RefWorker], tmp_path: Path
) -> None:
    FakeCache.gets = []
    asyncio.run(_scenario(package, make, tmp_path))
