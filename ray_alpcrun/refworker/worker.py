"""The plain ALPCRUN.CH worker: one process, no Ray, the seed guide step by step.

1. read node/pod (``METALCORE_WORKER_NODE``/``POD``; host and pid outside k8s);
2. connect to the queue manager and wait until the channel is ready (10 s);
3. register on ``WorkerUpdate`` with ``api_key``/``node``/``pod``, read the
   ``workerid`` response header, report IDLE;
4. on BIND open ``WorkerStream`` (``sessionid`` + ``workerid`` metadata), report
   BUSY and answer task batches one after the other (section 5.3 result rules);
5. on UNBIND answer what was already sent, half-close the stream, report IDLE.

Instructions are applied strictly in order by a
:class:`~ray_alpcrun.slot.SlotMachine` (the guide's worker blocks in
``processSession``): a BIND opens its stream only after the previous one ended;
unknown instruction types and undecodable frames are logged and skipped.

Everything runs on one asyncio loop so the update stream is read while a
session is served; the handler runs on one worker thread, so batches are
processed sequentially and the loop stays free for keepalives and UNBIND.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import grpc.aio

from ray_alpcrun import errors
from ray_alpcrun.answers import dead_batches, result_batches
from ray_alpcrun.config import (
    DEFAULT_NODE_CACHE_ADDR,
    DEFAULT_QUEUE_ADDR,
    Env,
    ServiceConfig,
    WorkerIdentity,
)
from ray_alpcrun.handler import HandlerSpec, load_handler
from ray_alpcrun.logs import fields
from ray_alpcrun.refworker.serve import EOF, SessionServer
from ray_alpcrun.rpc import CacheStub, QueueStub
from ray_alpcrun.runtime import HandlerRuntime, SharedSpec, describe
from ray_alpcrun.shared_data import SharedDataCache
from ray_alpcrun.slot import SlotMachine
from ray_alpcrun.transport import (
    MD_NODE,
    MD_POD,
    MD_SESSION_ID,
    MD_WORKER_ID,
    Stub,
    TlsFiles,
    make_metadata,
    open_channel,
    rpc_errors,
    translate,
)
from ray_alpcrun.types import (
    Batch,
    Instruction,
    SharedData,
    WorkerState,
    WorkerStatus,
)

log = logging.getLogger(__name__)


class _Served:
    """A :class:`SessionServer` and its task, as the slot machine sees a stream."""

    def __init__(self, server: SessionServer, serving: Coroutine[object, None, None]) -> None:
        self.session_id = server.session_id
        self.server = server
        self.closed = server.ended
        self.task = asyncio.get_running_loop().create_task(
            serving, name=f"serve-{server.session_id}"
        )
        self.task.add_done_callback(lambda _t: self.closed.set())

    async def drain(self, timeout_s: float | None) -> None:
        self.server.unbind()
        # A stream that ended cannot carry the answers still being computed: stop there.
        ended = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait(
                {self.task, ended}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()

    async def abort(self) -> None:
        if not self.task.done():
            self.server.abandon()
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# Shared-data payloads kept in-process, one entry per (session, level).
SHARED_CACHE_ENTRIES = 8


@dataclass(frozen=True, slots=True)
class ReferenceWorkerConfig:
    """Where the services are and how patient to be with them.

    ``service.cache_address`` is the NODE cache the worker reads shared data
    from. ``drain_timeout_s`` bounds the wait for the queue manager to end a
    half-closed stream after UNBIND or stop.
    """

    service: ServiceConfig = field(default_factory=ServiceConfig)
    identity: WorkerIdentity = field(default_factory=WorkerIdentity)
    connect_timeout_s: float = 10.0
    reconnect_delay_s: float = 1.0
    drain_timeout_s: float = 10.0
    unbind_grace_s: float = 0.2
    rpc_timeout_s: float = 30.0
    max_sessions: int = 32
    max_connect_attempts: int | None = None  # None: keep trying (a k8s worker outlives restarts)

    @classmethod
    def from_env(cls, env: Env | None = None, **overrides: Any) -> ReferenceWorkerConfig:
        """Addresses, API key and node/pod from ``METALCORE_*`` (defaults where unset)."""
        env = Env.read() if env is None else env
        service = ServiceConfig(
            queue_address=env.queue_addr or DEFAULT_QUEUE_ADDR,
            cache_address=env.cache_addr or DEFAULT_NODE_CACHE_ADDR,
            api_key=env.api_key,
            tls=TlsFiles(ca_cert=env.ca_cert) if env.ca_cert else None,
            cache_tls=TlsFiles(ca_cert=env.cache_ca_cert) if env.cache_ca_cert else None,
        )
        place = {k: v for k, v in (("node", env.worker_node), ("pod", env.worker_pod)) if v}
        overrides.setdefault("service", service)
        overrides.setdefault("identity", WorkerIdentity(**place))
        return cls(**overrides)


@dataclass(slots=True)
class WorkerStats:
    """Counters, for tests and logs."""

    registrations: int = 0
    bindings: int = 0
    batches: int = 0
    tasks: int = 0
    task_errors: int = 0
    dead_batches: int = 0
    shared_fetches: int = 0
    dropped_batches: int = 0  # arrived after the stream was half-closed
    undecodable_batches: int = 0  # could not be decoded, so not answerable


class ReferenceWorker:
    """Serves ALPCRUN.CH sessions with one handler (see the module docstring).

    ``await worker.run()`` until :meth:`stop` (graceful) or cancellation
    (abrupt: streams are cancelled without answering, like a crash). For a
    background thread use :func:`ray_alpcrun.refworker.start_in_thread`.
    """

    def __init__(self, config: ReferenceWorkerConfig, handler: HandlerSpec) -> None:
        self.config = config
        self.runtime = HandlerRuntime(load_handler(handler), max_sessions=config.max_sessions)
        self.stats = WorkerStats()
        self.worker_id: str | None = None
        self.registered = threading.Event()  # set once the first registration is done
        self._service = config.service
        self._identity_md = make_metadata(
            config.service.api_key,
            **{MD_NODE: config.identity.node, MD_POD: config.identity.pod},
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="alpcrun-refworker")
        self._machine: SlotMachine | None = None
        self.skipped_instructions = 0  # undecodable ones; unknown types: machine.skipped
        self._shared = SharedDataCache(
            self._fetch_shared, self._spec, max_entries=SHARED_CACHE_ENTRIES
        )
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: QueueStub | None = None
        self._cache: CacheStub | None = None
        self._updates: grpc.aio.StreamStreamCall[WorkerState, Instruction] | None = None
        self._update_lock: asyncio.Lock | None = None

    # --- life cycle -----------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to finish the batches in hand and return. Call it on the
        worker's loop (``loop.call_soon_threadsafe(worker.stop)`` from elsewhere)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        """Register and serve until stopped; re-register after the queue manager
        went away. Raises :class:`~ray_alpcrun.errors.AuthError` on a bad API key.
        A worker runs once: its handler thread is released at the end."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        self._update_lock = asyncio.Lock()
        failures = 0  # consecutive attempts that did not even register
        try:
            while not self._stop.is_set():
                registered = self.stats.registrations
                try:
                    await self._register_and_serve()
                except (errors.AuthError, errors.ProtocolError):
                    raise
                except errors.RpcError as exc:
                    failures = failures + 1 if self.stats.registrations == registered else 1
                    limit = self.config.max_connect_attempts
                    if limit is not None and failures >= limit:
                        raise
                    log.warning("queue manager unavailable: %s", exc)
                if not self._stop.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.config.reconnect_delay_s)
        finally:
            await self._abandon_all()
            await self._shared.close()
            self._close_runtime()

    def _close_runtime(self) -> None:
        # End every session's state on the handler thread without waiting for it:
        # after a kill that thread may still be inside a handler.
        with contextlib.suppress(RuntimeError):
            self._executor.submit(self.runtime.close)
        self._executor.shutdown(wait=False, cancel_futures=False)

    async def _register_and_serve(self) -> None:
        """Connect, register, and follow instructions until the update stream ends."""
        svc = self._service
        channel = open_channel(svc.queue_address, svc.tls, svc.max_message_bytes)
        cache_channel = open_channel(svc.cache_address, svc.cache_tls, svc.max_message_bytes)
        try:
            with rpc_errors():
                try:
                    await asyncio.wait_for(channel.channel_ready(), self.config.connect_timeout_s)
                except asyncio.TimeoutError:
                    raise errors.UnavailableError(
                        "UNAVAILABLE", f"queue manager {svc.queue_address} not ready in time"
                    ) from None
                self._queue = Stub(channel, "Queue", svc.proto_package)
                self._cache = Stub(cache_channel, "Cache", svc.proto_package)
                await self._follow_instructions()
        finally:
            await self._abandon_all()
            await channel.close(None)
            await cache_channel.close(None)

    async def _follow_instructions(self) -> None:
        assert self._stop is not None and self._queue is not None
        self._updates = updates = self._queue.WorkerUpdate(metadata=self._identity_md)
        header = dict(await updates.initial_metadata() or ())
        worker_id = header.get(MD_WORKER_ID)
        if not worker_id:
            # A rejected call (bad API key, ...) has no header: reading raises its status.
            await updates.read()
            updates.cancel()
            raise errors.ProtocolError("WorkerUpdate answered without a 'workerid' header")
        self.worker_id = str(worker_id)
        self.stats.registrations += 1
        self._machine = machine = SlotMachine(
            self._open_stream,
            self._report,
            drain_timeout_s=self.config.drain_timeout_s,
            name=self.worker_id,
        )
        runner = asyncio.ensure_future(machine.run())
        await self._report(WorkerStatus.IDLE)
        self.registered.set()
        log.info("worker registered", extra=fields(worker=self.worker_id))
        stopping = asyncio.ensure_future(self._stop.wait())
        read: asyncio.Future[Any] | None = None
        try:
            while True:
                read = asyncio.ensure_future(updates.read())
                await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    # Stay registered while draining, so the queue manager takes
                    # the answers instead of re-queueing the batches in flight.
                    await machine.stop(self.config.drain_timeout_s)
                    return
                instruction = read.result()
                if instruction is EOF:
                    log.warning("queue manager ended the update stream")
                    return
                if not isinstance(instruction, Instruction):
                    # grpc hands over None when the frame could not be decoded.
                    self.skipped_instructions += 1
                    log.warning("undecodable instruction skipped")
                    continue
                machine.instruct(instruction)
        finally:
            stopping.cancel()
            if read is not None:
                read.cancel()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await self._abandon_all()
            updates.cancel()

    # --- instructions -----------------------------------------------------------

    def _open_stream(self, session_id: str) -> _Served:
        metadata = self._identity_md + make_metadata(
            None, **{MD_SESSION_ID: session_id, MD_WORKER_ID: self.worker_id or ""}
        )
        assert self._queue is not None
        server = SessionServer(
            session_id,
            self._queue.WorkerStream(metadata=metadata),
            partial(self._answer, session_id=session_id),
            self.config.unbind_grace_s,
            self.config.drain_timeout_s,
        )
        self.stats.bindings += 1
        return _Served(server, self._serve(server))

    async def _abandon_all(self) -> None:
        """Cancel the stream held without answering (the queue manager re-queues)."""
        machine, self._machine = self._machine, None
        if machine is not None:
            await machine.close()

    async def _report(self, status: WorkerStatus, session_id: str = "") -> None:
        assert self._update_lock is not None and self.worker_id is not None
        assert self._updates is not None
        async with self._update_lock:
            # A broken update stream is noticed (and re-registered) by its reader.
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self._updates.write(WorkerState(self.worker_id, status, session_id))

    # --- serving one session ----------------------------------------------------

    async def _serve(self, server: SessionServer) -> None:
        sid = server.session_id
        log.info("serving session", extra=fields(worker=self.worker_id, session=sid))
        try:
            await server.run()
        except grpc.RpcError as exc:
            if not server.abandoned:
                log.warning("session stream failed: %s", translate(exc), extra=fields(session=sid))
        finally:
            self.stats.dropped_batches += server.dropped_batches
            self.stats.undecodable_batches += server.undecodable_batches
            self._end_session(sid)

    def _end_session(self, session_id: str) -> None:
        # Queued on the handler thread, not awaited: it runs after the batch in
        # hand (which may outlive a broken stream) and before the next session's.
        # The fetched shared-data bytes stay cached (bounded LRU): an UNBIND is
        # often rebalancing, and the session comes back.
        with contextlib.suppress(RuntimeError):  # the executor is shut down
            self._executor.submit(self.runtime.end_session, session_id)

    async def _answer(self, batch: Batch, *, session_id: str) -> list[Batch]:
        sid = batch.session_id or session_id
        payloads = [m.payload for m in batch.messages]
        limit = self._service.max_message_bytes
        assert self._loop is not None
        try:
            shared = None
            if batch.use_shared_data:
                # Exactly the level asked for; "latest" follows the cache (shared_data.py).
                level = batch.required_shared_data_update_level
                shared = await self._shared.get(sid, level)
            outcomes = await self._loop.run_in_executor(
                self._executor, self.runtime.run, sid, payloads, shared
            )
        except Exception as exc:  # setup failed: nothing in this batch can run
            self.stats.dead_batches += 1
            reason = describe(exc)
            log.warning("batch answered dead: %s", reason, extra=fields(batch=batch.id))
            return dead_batches(batch, reason, limit, session_id=sid)
        # What does not fit the message limit becomes per-task errors that do (answers.py).
        answer = result_batches(batch, outcomes, limit, session_id=sid)
        self.stats.task_errors += sum(1 for b in answer for m in b.messages if m.error is not None)
        self.stats.batches += 1
        self.stats.tasks += len(batch.messages)
        return answer

    # --- shared data ------------------------------------------------------------

    async def _fetch_shared(self, session_id: str, level: int | None) -> SharedData:
        request = SharedData(session_id=session_id, update_level=level)
        assert self._cache is not None
        with rpc_errors():
            reply: SharedData = await self._cache.GetSharedData(
                request, metadata=self._identity_md, timeout=self.config.rpc_timeout_s
            )
        self.stats.shared_fetches += 1
        return reply

    @staticmethod
    async def _spec(_session_id: str, level: int | None, payload: bytes) -> SharedSpec:
        return SharedSpec(level, lambda: payload)
