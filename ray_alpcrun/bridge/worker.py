"""The gRPC side of the bridge: K logical ALPCRUN.CH workers ("slots").

Each slot registers on ``WorkerUpdate`` (reading its ``workerid`` header),
reports IDLE/BUSY and follows BIND/UNBIND by opening or draining a
:class:`WorkerStream`. Connection loss is retried with exponential backoff and
jitter; configuration errors (API key, TLS trust, proto package) stop the
bridge with a :class:`~ray_alpcrun.errors.FatalError` (see
:mod:`ray_alpcrun.bridge.settings`). Never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import grpc
import grpc.aio

from ray_alpcrun import errors, transport
from ray_alpcrun.bridge.ends import EndsFirst
from ray_alpcrun.bridge.preflight import check_node_cache
from ray_alpcrun.bridge.session import Link, Processor, WorkerStream
from ray_alpcrun.bridge.settings import WorkerSettings, backoff_delay, fatal_for
from ray_alpcrun.bridge.stats import BridgeStats
from ray_alpcrun.logs import fields
from ray_alpcrun.rpc import CacheStub, QueueStub
from ray_alpcrun.shared_data import SharedDataCache
from ray_alpcrun.slot import SlotMachine
from ray_alpcrun.transport import MD_NODE, MD_POD, MD_WORKER_ID
from ray_alpcrun.types import (
    Instruction,
    SharedData,
    WorkerState,
    WorkerStatus,
)

log = logging.getLogger(__name__)

# At stop, the end hooks of sessions still held get this long, all together.
END_AT_STOP_S = 5.0


class Slot:
    """One logical worker: one registration whose instructions a
    :class:`~ray_alpcrun.slot.SlotMachine` applies in order."""

    def __init__(self, worker: BridgeWorker, index: int) -> None:
        self.worker = worker
        self.index = index
        pod = worker.settings.pod
        # Distinct pods let a queue manager that matches streams by node+pod tell slots apart.
        self.pod = pod if worker.settings.slots == 1 else f"{pod}-s{index}"
        self.worker_id = ""
        self.machine: SlotMachine | None = None
        self._call: grpc.aio.StreamStreamCall[WorkerState, Instruction] | None = None
        self._lock = asyncio.Lock()
        self.registered = asyncio.Event()
        self.skipped_instructions = 0
        self.registrations = 0
        self.retired = False  # set by BridgeWorker.resize: drain, then end the registration

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


class BridgeWorker:
    """Owns the channels and the slots; ``run()`` until ``stop()`` or a fatal error."""

    def __init__(self, settings: WorkerSettings, processor: Processor) -> None:
        if settings.slots < 1:
            raise errors.ConfigError("slots must be at least 1")
        self.settings = settings
        self.processor = processor
        self.compute = EndsFirst(processor)  # what the session streams call
        self.stats = BridgeStats()
        self.slots = [Slot(self, i) for i in range(settings.slots)]
        self.base_metadata = transport.make_metadata(settings.api_key, **{MD_NODE: settings.node})
        self._stopping = asyncio.Event()
        self._rng = random.Random()
        self._holders: dict[str, set[Slot]] = {}
        self._linger: dict[str, asyncio.Task[None]] = {}
        self._slot_tasks: dict[Slot, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._resized = asyncio.Event()
        self._next_index = settings.slots
        self.reconnects = 0
        # Set at the first registration: only then does the bridge serve the queue.
        self.first_registered = asyncio.Event()
        # What the last drained stop did: batches answered after it began, and
        # batches that arrived during it and were left to the queue manager.
        self.drained = 0
        self.not_started = 0
        self.queue: QueueStub  # with link and _cache, set by _open()
        self._cache: CacheStub
        self.link: Link
        self._channels: list[grpc.aio.Channel] = []

    # -- session bookkeeping: end a session on the actors once no slot serves it

    def hold(self, session_id: str, slot: Slot) -> None:
        self._holders.setdefault(session_id, set()).add(slot)
        task = self._linger.pop(session_id, None)
        if task is not None:
            task.cancel()

    def release(self, session_id: str, slot: Slot) -> None:
        holders = self._holders.get(session_id)
        if holders is None:
            return
        holders.discard(slot)
        if not holders:
            del self._holders[session_id]
            if session_id not in self._linger:
                self._linger[session_id] = asyncio.create_task(self._end_later(session_id))

    async def _end_later(self, session_id: str) -> None:
        try:
            await asyncio.sleep(self.settings.session_linger_s)
        finally:
            self._linger.pop(session_id, None)
        # From here a BIND of the session cannot cancel the end: its batches wait
        # for it instead (EndsFirst).
        await self._end_session(session_id)

    async def _end_session(self, session_id: str) -> None:
        self.link.shared.forget(session_id)
        try:
            await self.compute.end_session(session_id)
        except Exception:
            log.exception("ending session failed", extra=fields(session=session_id))
        log.info("session released", extra=fields(session=session_id))

    async def _end_sessions_at_stop(self, session_ids: list[str]) -> None:
        """Run the end hooks of the sessions still held, together and bounded: an
        actor stuck in a handler must not hold the stop (its hook is skipped)."""
        if not session_ids:
            return
        ends = [asyncio.create_task(self._end_session(sid)) for sid in session_ids]
        _, late = await asyncio.wait(ends, timeout=END_AT_STOP_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            log.warning(
                "on_session_end not finished at stop; skipped",
                extra=fields(sessions=len(late), timeout_s=END_AT_STOP_S),
            )

    @property
    def bound_sessions(self) -> list[str]:
        return sorted(self._holders)

    # -- running

    async def _fetch_shared(self, session_id: str, level: int | None) -> SharedData:
        with transport.rpc_errors():
            reply: SharedData = await self._cache.GetSharedData(
                SharedData(session_id=session_id, update_level=level),
                metadata=self.base_metadata,
            )
        return reply

    def _open(self) -> None:
        if self._channels:
            return
        s = self.settings
        qch = transport.open_channel(s.queue_address, s.tls, s.max_message_bytes)
        cch = transport.open_channel(s.cache_address, s.cache_tls, s.max_message_bytes)
        self._channels = [qch, cch]
        self.queue = QueueStub(qch, s.proto_package)
        self._cache = CacheStub(cch, s.proto_package)
        self.link = Link(
            queue=self.queue,
            metadata=self.base_metadata,
            shared=SharedDataCache(self._fetch_shared, self.processor.share),
            processor=self.compute,
            stats=self.stats,
            max_message_bytes=s.max_message_bytes,
        )

    async def preflight(self) -> None:
        """Check the API key and TLS trust (see :mod:`ray_alpcrun.bridge.preflight`)."""
        self._open()
        s = self.settings
        await check_node_cache(self._cache, self.base_metadata, s, timeout_s=s.connect_timeout_s)

    async def run(self) -> None:
        """Serve until ``stop()``; raises FatalError for what retrying cannot fix."""
        self._open()
        for slot in self.slots:
            self._slot_tasks[slot] = asyncio.create_task(self._slot_loop(slot))
        try:
            while self._slot_tasks:
                resized = asyncio.ensure_future(self._resized.wait())
                running = set(self._slot_tasks.values())
                done, _ = await asyncio.wait(
                    {*running, resized}, return_when=asyncio.FIRST_COMPLETED
                )
                resized.cancel()
                self._resized.clear()
                for slot, task in list(self._slot_tasks.items()):
                    if task not in done:
                        continue
                    del self._slot_tasks[slot]
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]  # a fatal error
        finally:
            tasks = list(self._slot_tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Sessions released shortly before the stop end now, not never.
            ending = list(dict.fromkeys([*self._linger, *self._holders]))
            for linger in list(self._linger.values()):
                linger.cancel()
            await self._end_sessions_at_stop(ending)
            if self._channels:
                await self.link.shared.close()
            for ch in self._channels:
                await ch.close(None)

    async def _slot_loop(self, slot: Slot) -> None:
        s = self.settings
        attempt = 0
        while not self._stopping.is_set() and not slot.retired:
            registrations = slot.registrations
            try:
                await slot.serve()
            except asyncio.CancelledError:
                # stop() cancels the calls; anything else cancelling us must propagate.
                if self._stopping.is_set() or slot.retired:
                    return
                raise
            except grpc.aio.AioRpcError as exc:
                if slot.retired:
                    return
                err = transport.translate(exc)
                fatal = fatal_for(err, s, "queue manager")
                if fatal is not None:
                    raise fatal from exc
                log.warning(
                    "queue manager connection lost",
                    extra=fields(slot=slot.index, code=err.code, details=err.details),
                )
            except errors.ProtocolError as exc:
                log.error("protocol error", extra=fields(slot=slot.index, error=str(exc)))
            if self._stopping.is_set() or slot.retired:
                return
            if slot.registrations != registrations:
                # Count only consecutive failures: a registration that worked (then
                # ended, normally or not) starts the count again, as the reference
                # worker does; otherwise reconnects spread over days add up to exit 7.
                attempt = 0
            if s.max_connect_attempts is not None and attempt >= s.max_connect_attempts:
                raise errors.FatalError(
                    errors.EXIT_UNAVAILABLE,
                    f"queue manager at {s.queue_address} unreachable after {attempt} attempts",
                )
            delay = backoff_delay(attempt, s.backoff_initial_s, s.backoff_max_s, self._rng)
            attempt += 1
            self.reconnects += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    # -- logical workers that follow the pool (--slots auto on an elastic pool)

    def resize(self, count: int) -> None:
        """Keep ``count`` (at least 1) logical workers registered.

        New slots register at once. Surplus slots retire idle ones first; a
        retiring slot with a session drains it like an UNBIND (batches in flight
        finish and are answered, IDLE is reported) before its registration ends.
        """
        count = max(1, count)
        active = [slot for slot in self.slots if not slot.retired]
        if self._stopping.is_set() or count == len(active):
            return
        if count > len(active):
            for _ in range(count - len(active)):
                slot = Slot(self, self._next_index)
                self._next_index += 1
                self.slots.append(slot)
                if self._slot_tasks or self._channels:
                    self._slot_tasks[slot] = asyncio.create_task(self._slot_loop(slot))
            log.info("logical workers: %d -> %d", len(active), count)
        else:
            surplus = sorted(active, key=lambda x: (x.session is not None, -x.index))
            for slot in surplus[: len(active) - count]:
                slot.retired = True
                task = asyncio.create_task(self._retire(slot))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            log.info("logical workers: %d -> %d (draining the rest)", len(active), count)
        self._resized.set()

    async def _retire(self, slot: Slot) -> None:
        try:
            await slot.drain(self.settings.drain_timeout_s)
        finally:
            if slot._call is not None:
                slot._call.cancel()
            task = self._slot_tasks.get(slot)
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), 5.0)
                task.cancel()
            if slot in self.slots:
                self.slots.remove(slot)
            self._resized.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def ready(self) -> bool:
        """True when every slot registered at start (and not retired since) holds a
        registration, and at least one slot does."""
        first = [x for x in self.slots if x.index < self.settings.slots and not x.retired]
        return all(x.registered.is_set() for x in first) and any(
            x.registered.is_set() for x in self.slots
        )

    async def wait_registered(self, timeout_s: float) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(slot.registered.wait() for slot in self.slots)), timeout_s
        )

    async def stop(self, drain: bool = True) -> None:
        """Stop serving: with ``drain``, finish batches in flight (bounded by
        ``drain_timeout_s``), send their results, report IDLE, half-close."""
        self._stopping.set()
        if drain:
            streams = [slot.session for slot in self.slots if slot.session is not None]
            answered = self.stats.batches_done - self.stats.results_dropped
            await asyncio.gather(
                *(slot.drain(self.settings.drain_timeout_s) for slot in self.slots),
                return_exceptions=True,
            )
            self.drained = self.stats.batches_done - self.stats.results_dropped - answered
            self.not_started = sum(stream.refused for stream in streams)
        for slot in self.slots:
            if slot._call is not None:
                slot._call.cancel()
