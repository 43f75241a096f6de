"""Raw-stub roles for the devserver tests: a worker that follows the seed guide
step by step and a client, both speaking section 5.3 through ``transport.Stub``
only (no project client or worker code), plus a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from ray_alpcrun import transport
from ray_alpcrun.devserver import DevServerConfig, LocalServices
from ray_alpcrun.types import (
    Batch,
    Instruction,
    InstructionType,
    Message,
    SessionAttributes,
    SessionInfo,
    WorkerState,
    WorkerStatus,
)

Answer = Callable[[Batch], Awaitable[Batch | None]]


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_config(**overrides: Any) -> DevServerConfig:
    return DevServerConfig(queue_port=0, central_cache_port=0, node_cache_port=0, **overrides)


def md(svc: LocalServices, **extra: str) -> transport.Metadata:
    return transport.make_metadata(svc.api_key, **extra)


def queue_stub(svc: LocalServices, channel: grpc.aio.Channel) -> Any:
    return transport.Stub(channel, "Queue", svc.proto_package)


async def echo(batch: Batch) -> Batch:
    """The seed's processBatch: same id and session, one result per task."""
    return Batch(
        id=batch.id,
        session_id=batch.session_id,
        messages=[
            Message(id=m.id, payload=m.payload[::-1], related_id=m.id) for m in batch.messages
        ],
        dead=False,
    )


async def _drain(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        item = await queue.get()
        if item is None:
            return
        yield item


class RawWorker:
    """A worker written from section 5.3 and the seed guide.

    Registers on WorkerUpdate (node/pod metadata), reads the ``workerid`` header,
    reports IDLE, and on BIND serves the session on WorkerStream until the server
    ends it (the instruction loop waits meanwhile, as in the seed); on UNBIND it
    reports IDLE again. ``answer`` returns the result batch, or None to hold the
    batch (never answer it).
    """

    def __init__(
        self,
        svc: LocalServices,
        node: str = "node-1",
        pod: str = "pod-1",
        answer: Answer = echo,
        tls: transport.TlsFiles | None = None,
        report_once: bool = False,
        stream_by_id: bool = False,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.svc, self.node, self.pod, self.answer, self.tls = svc, node, pod, answer, tls
        self._shared_channel = channel  # one connection for several workers (a bridge's)
        self.report_once = report_once  # half-close WorkerUpdate after the first IDLE
        self.stream_by_id = stream_by_id  # WorkerStream with workerid instead of node/pod
        self.worker_id = ""
        self.received: list[Batch] = []
        self.instructions: list[Instruction] = []
        self.got_batch = asyncio.Event()
        self.instructed = asyncio.Event()
        self._states: asyncio.Queue[WorkerState | None] = asyncio.Queue()
        self._results: asyncio.Queue[Batch | None] | None = None
        self._stream: Any = None
        self._broken = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawWorker:
        self._channel = self._shared_channel or transport.open_channel(
            self.svc.queue_address, self.tls
        )
        self._stub = queue_stub(self.svc, self._channel)
        self._update = self._stub.WorkerUpdate(
            _drain(self._states), metadata=md(self.svc, node=self.node, pod=self.pod)
        )
        header = dict(await self._update.initial_metadata())
        self.worker_id = header[transport.MD_WORKER_ID]
        self.report(WorkerStatus.IDLE)
        if self.report_once:
            self._states.put_nowait(None)
        self._task = asyncio.create_task(self._instructions())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    def report(self, status: WorkerStatus) -> None:
        self._states.put_nowait(WorkerState(self.worker_id, status))

    async def kill(self) -> None:
        """Die abruptly: both calls cancelled, nothing more answered."""
        if self._stream is not None:
            self._stream.cancel()
        self._update.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._task
        if self._shared_channel is None:
            await self._channel.close(None)

    def break_stream(self) -> None:
        """Cut the current WorkerStream (the registration stays)."""
        if self._stream is not None:
            self._broken = True
            self._stream.cancel()

    def send(self, batch: Batch) -> None:
        """Send an extra result batch on the current WorkerStream."""
        assert self._results is not None
        self._results.put_nowait(batch)

    async def _instructions(self) -> None:
        async for instruction in self._update:
            self.instructions.append(instruction)
            self.instructed.set()
            if instruction.type == InstructionType.BIND:
                await self._serve(instruction.session_id)
            else:
                self.report(WorkerStatus.IDLE)

    async def _serve(self, session_id: str) -> None:
        self._results = asyncio.Queue()
        if self.stream_by_id:
            meta = md(self.svc, workerid=self.worker_id, sessionid=session_id)
        else:
            meta = md(self.svc, node=self.node, pod=self.pod, sessionid=session_id)
        self._stream = self._stub.WorkerStream(_drain(self._results), metadata=meta)
        self._broken = False
        try:
            async for batch in self._stream:
                self.received.append(batch)
                self.got_batch.set()
                result = await self.answer(batch)
                if result is not None:
                    self._results.put_nowait(result)
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            if not self._broken:  # the worker itself is being stopped
                raise
        self._stream = None


class RawClient:
    """One ClientStream driven by hand: ``send`` batches, read ``results``."""

    def __init__(self, svc: LocalServices, session_id: str = "") -> None:
        self.svc = svc
        self.session_id = session_id
        self._out: asyncio.Queue[Batch | None] = asyncio.Queue()

    async def __aenter__(self) -> RawClient:
        self._channel = transport.open_channel(self.svc.queue_address)
        self.stub = queue_stub(self.svc, self._channel)
        extra = {"sessionid": self.session_id} if self.session_id else {}
        self.call = self.stub.ClientStream(_drain(self._out), metadata=md(self.svc, **extra))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        await self._channel.close(None)

    def send(self, batch: Batch) -> None:
        self._out.put_nowait(batch)

    def half_close(self) -> None:
        self._out.put_nowait(None)

    async def read(self, n_tasks: int) -> list[Message]:
        """Read result batches until ``n_tasks`` results arrived."""
        out: list[Message] = []
        while len(out) < n_tasks:
            batch = await self.call.read()
            assert batch is not grpc.aio.EOF, f"stream ended after {len(out)} results"
            out.extend(batch.messages)
        return out

    async def read_all(self) -> list[Batch]:
        """Read result batches until the server ends the stream."""
        out = []
        while (batch := await self.call.read()) is not grpc.aio.EOF:
            out.append(batch)
        return out


async def create_session(
    svc: LocalServices, channel: grpc.aio.Channel, **attributes: Any
) -> SessionInfo:
    attrs = SessionAttributes(**attributes) if attributes else None
    session: SessionInfo = await queue_stub(svc, channel).CreateSession(
        SessionInfo(app_id="test-app", attributes=attrs), metadata=md(svc)
    )
    return session


def tasks(session_id: str, n: int, per_batch: int = 1, priority: int = 0) -> list[Batch]:
    """``n`` tasks with payloads ``b"t<i>"`` in batches of ``per_batch``."""
    out = []
    for start in range(0, n, per_batch):
        msgs = [
            Message(id=f"t{i}", payload=b"t%d" % i) for i in range(start, min(n, start + per_batch))
        ]
        out.append(Batch(session_id=session_id, priority=priority, messages=msgs))
    return out


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition the server exposes no event for (stats); a backstop, not a delay."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)  # ok: polling server-side counters


def snapshot(svc: LocalServices, session_id: str) -> str:
    """The queue manager's view of a session and its workers, for failure messages."""
    core = svc.core
    s = core.sessions.get(session_id)
    if s is None:
        return f"session {session_id} is not open"
    streams = [(c.worker.id, len(c.inflight), c.draining, c.closed) for c in s.streams]
    workers = [
        (w.id, w.bound.id if w.bound else None, w.eligible, w.status, list(w.streams))
        for w in core.workers.by_id.values()
    ]
    return (
        f"queued={s.tasks.batches} inflight={s.inflight_batches} unanswered={s.unanswered_tasks} "
        f"results={len(s.results)} hungry={len(s.hungry)} streams={streams} workers={workers}"
    )
