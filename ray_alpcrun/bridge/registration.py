"""One logical ALPCRUN.CH worker of the bridge: one registration on
``WorkerUpdate`` at a time, whose instructions a
:class:`~ray_alpcrun.slot.SlotMachine` applies in order. The slot sees its
worker (:class:`~ray_alpcrun.bridge.worker.BridgeWorker`) only as a
:class:`SlotOwner`. Never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.bridge.session import Link, WorkerStream
from ray_alpcrun.bridge.settings import WorkerSettings
from ray_alpcrun.logs import fields
from ray_alpcrun.rpc import QueueStub
from ray_alpcrun.slot import SlotMachine
from ray_alpcrun.transport import MD_POD, MD_WORKER_ID, Metadata
from ray_alpcrun.types import Instruction, WorkerState, WorkerStatus

log = logging.getLogger(__name__)


class SlotOwner(Protocol):
    """What a slot needs from the worker that owns it."""

    settings: WorkerSettings
    base_metadata: Metadata
    queue: QueueStub
    link: Link
    first_registered: asyncio.Event  # set at the first registration of any slot

    def hold(self, session_id: str, slot: Slot) -> None:
        """The slot serves ``session_id`` now."""

    def release(self, session_id: str, slot: Slot) -> None:
        """The slot stopped serving ``session_id``."""


class Slot:
    """One logical worker: one registration whose instructions a
    :class:`~ray_alpcrun.slot.SlotMachine` applies in order."""

    def __init__(self, worker: SlotOwner, index: int) -> None:
        self.worker = worker
        self.index = index
        pod = worker.settings.pod
        # Distinct pods let a queue manager that matches streams by node+pod tell slots apart.
        # (A worker that starts with one slot and grows names the later ones apart too.)
        self.pod = pod if worker.settings.slots == 1 and index == 0 else f"{pod}-s{index}"
        self.worker_id = ""
        self.machine: SlotMachine | None = None
        self._call: grpc.aio.StreamStreamCall[WorkerState, Instruction] | None = None
        self._lock = asyncio.Lock()
        self.registered = asyncio.Event()
        self.skipped_instructions = 0
        self.registrations = 0
        self.retired = False  # set by BridgeWorker.resize: drain, then end the registration
        self.pausing = False  # set by unregister(): this registration is ended on purpose
        self._unregistering: asyncio.Task[None] | None = None

    @property
    def session(self) -> WorkerStream | None:
        current = None if self.machine is None else self.machine.current
        return current if isinstance(current, WorkerStream) else None

    async def _report(self, status: WorkerStatus, session_id: str = "") -> None:
        if self._call is None:
            return
        # A finished call raises InvalidStateError; its reader notices and re-registers.
        with contextlib.suppress(
            grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
        ):
            async with self._lock:
                await self._call.write(WorkerState(self.worker_id, status, session_id))

    def _open_stream(self, session_id: str) -> WorkerStream:
        stream = WorkerStream(self.worker.link, session_id, self.worker_id, self.pod)
        self.worker.hold(session_id, self)
        stream.start()
        return stream

    async def serve(self) -> None:
        """One registration, until the update stream ends (raises on failure)."""
        w = self.worker
        metadata = (*w.base_metadata, (MD_POD, self.pod))
        self._call = call = w.queue.WorkerUpdate(metadata=metadata)
        machine: SlotMachine | None = None
        runner: asyncio.Task[None] | None = None
        try:
            header = dict(await call.initial_metadata() or ())
            self.worker_id = str(header.get(MD_WORKER_ID, ""))
            if not self.worker_id:
                first = await call.read()  # surfaces the server's error status
                raise errors.ProtocolError(
                    f"queue manager sent no '{MD_WORKER_ID}' header (first frame: {first!r})"
                )
            self.machine = machine = SlotMachine(
                self._open_stream,
                self._report,
                lambda sid: w.release(sid, self),
                drain_timeout_s=w.settings.drain_timeout_s,
                name=self.worker_id,
            )
            runner = asyncio.create_task(machine.run(), name=f"slot-{self.index}")
            await self._report(WorkerStatus.IDLE)
            self.registered.set()
            w.first_registered.set()
            self.registrations += 1
            log.info(
                "registered", extra=fields(worker=self.worker_id, slot=self.index, pod=self.pod)
            )
            while True:
                instruction = await call.read()
                if instruction is grpc.aio.EOF:  # type: ignore[attr-defined]
                    log.info("update stream ended", extra=fields(worker=self.worker_id))
                    return
                if not isinstance(instruction, Instruction):
                    # grpc hands over None when the frame could not be decoded.
                    self.skipped_instructions += 1
                    log.warning("undecodable instruction skipped", extra=fields(slot=self.index))
                    continue
                machine.instruct(instruction)
        finally:
            self.registered.clear()
            if runner is not None:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
            if machine is not None:
                # The registration is gone: the queue manager re-queues what is in flight.
                await machine.close()
            call.cancel()
            self._call = None

    async def drain(self, timeout_s: float) -> None:
        """Graceful stop: finish the session's batches, report IDLE, end the registration."""
        if self.machine is not None and self._call is not None:
            await self.machine.stop(timeout_s)
        if self._call is not None:
            with contextlib.suppress(
                grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
            ):
                async with self._lock:
                    await self._call.done_writing()

    def unregister(self, timeout_s: float) -> asyncio.Task[None] | None:
        """End this registration on purpose, in the background: drain like an
        UNBIND (what it holds is answered), then end the call. ``pausing`` tells
        the slot's loop so; it waits in :meth:`unregistered` before registering
        again. Returns the task (None when there is no registration to end)."""
        call = self._call
        if call is None or self._unregistering is not None:
            return None
        self.pausing = True
        self._unregistering = asyncio.create_task(self._unregister(call, timeout_s))
        return self._unregistering

    async def _unregister(
        self, call: grpc.aio.StreamStreamCall[WorkerState, Instruction], timeout_s: float
    ) -> None:
        try:
            await self.drain(timeout_s)
        finally:
            call.cancel()  # that registration's call only, even if it ended already

    async def unregistered(self) -> None:
        """The registration that :meth:`unregister` ended is over: wait for its drain."""
        task, self._unregistering = self._unregistering, None
        self.pausing = False
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
