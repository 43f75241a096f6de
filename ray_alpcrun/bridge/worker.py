"""The gRPC side of the bridge: K logical ALPCRUN.CH workers ("slots").

Each slot registers on ``WorkerUpdate`` (reading its ``workerid`` header),
reports IDLE/BUSY and follows BIND/UNBIND by opening or draining a
:class:`WorkerStream` (:mod:`ray_alpcrun.bridge.registration`). While the
compute side cannot serve, the slots stop taking work (:meth:`BridgeWorker.pause`):
they drain and end their registrations, and register again on
:meth:`BridgeWorker.resume`. Connection loss is retried with exponential backoff and
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
from ray_alpcrun.bridge.preflight import check_node_cache, probe_node_cache
from ray_alpcrun.bridge.registration import Slot
from ray_alpcrun.bridge.session import Link, Processor
from ray_alpcrun.bridge.settings import WorkerSettings, backoff_delay, fatal_for
from ray_alpcrun.bridge.stats import BridgeStats
from ray_alpcrun.logs import fields
from ray_alpcrun.rpc import CacheStub, QueueStub
from ray_alpcrun.shared_data import SharedDataCache
from ray_alpcrun.transport import MD_NODE
from ray_alpcrun.types import SharedData

__all__ = ["BridgeWorker", "Slot"]

log = logging.getLogger(__name__)

# At stop, the end hooks of sessions still held get this long, all together.
END_AT_STOP_S = 5.0
# While the node cache cannot be reached: a line naming it this often, retries
# at most this far apart.
CACHE_LOG_EVERY_S = 30.0
CACHE_RETRY_MAX_S = 5.0


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
        # Set by the bridge while nothing here can finish a batch (see Link.give_back).
        self.give_back = asyncio.Event()
        self._rng = random.Random()
        self._holders: dict[str, set[Slot]] = {}
        self._linger: dict[str, asyncio.Task[None]] = {}
        self._slot_tasks: dict[Slot, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._resized = asyncio.Event()
        self._next_index = settings.slots
        self.paused: str | None = None
        """Why the slots take no work now (see pause); None while they do."""
        self._resumed = asyncio.Event()  # set while not paused, and at stop
        self._resumed.set()
        self._pausing: set[asyncio.Task[None]] = set()
        self._closing = False
        self.reconnects = 0
        self.cache_unreachable: str | None = None
        """Why the node cache cannot be reached (no work is taken meanwhile), or None."""
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
        self.link.answers.forget(session_id)
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
            give_back=self.give_back,
        )

    async def preflight(self) -> None:
        """Check the API key and TLS trust (see :mod:`ray_alpcrun.bridge.preflight`)."""
        self._open()
        s = self.settings
        await check_node_cache(self._cache, self.base_metadata, s, timeout_s=s.connect_timeout_s)

    async def wait_for_cache(self) -> None:
        """Take no work until the node cache answers: a wrong ``--cache`` would
        otherwise dead-letter every batch with shared data. Retried (a node cache
        may start after the bridge), with one line naming the address at once and
        every ``CACHE_LOG_EVERY_S`` while it cannot be reached; ``cache_unreachable``
        says why meanwhile (``/readyz`` answers 503 with it). With
        ``--connect-attempts N`` it gives up after N attempts (exit 7)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        logged = -CACHE_LOG_EVERY_S
        pause_s = 0.5
        attempts = 0
        while not self._stopping.is_set():
            attempts += 1
            why = await probe_node_cache(
                self._cache, self.base_metadata, s, timeout_s=s.connect_timeout_s
            )
            if why is None:
                if self.cache_unreachable is not None:
                    log.info("node cache reachable", extra=fields(address=s.cache_address))
                self.cache_unreachable = None
                return
            self.cache_unreachable = (
                f"node cache at {s.cache_address} unreachable ({why}); check --cache "
                "(and --cache-ca-cert, if it speaks TLS)"
            )
            if s.max_connect_attempts is not None and attempts >= s.max_connect_attempts:
                raise errors.FatalError(
                    errors.EXIT_UNAVAILABLE,
                    f"node cache at {s.cache_address} unreachable after {attempts} attempts "
                    f"({why}); check --cache",
                )
            if loop.time() - logged >= CACHE_LOG_EVERY_S:
                logged = loop.time()
                log.warning(
                    "node cache unreachable: taking no work until it answers",
                    extra=fields(address=s.cache_address, reason=why),
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause_s)
            pause_s = min(2 * pause_s, CACHE_RETRY_MAX_S)

    async def run(self) -> None:
        """Serve until ``stop()``; raises FatalError for what retrying cannot fix."""
        self._open()
        await self.wait_for_cache()
        for slot in self.slots:
            if slot not in self._slot_tasks:  # resize() started those added meanwhile
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
            self._closing = True
            tasks = [*self._slot_tasks.values(), *self._pausing]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Sessions released shortly before the stop end now, not never.
            ending = list(dict.fromkeys([*self._linger, *self._holders]))
            for linger in list(self._linger.values()):
                linger.cancel()
            await self._end_sessions_at_stop(ending)
            if self._channels:
                await self.link.answers.close()
                await self.link.shared.close()
            for ch in self._channels:
                await ch.close(None)

    async def _slot_loop(self, slot: Slot) -> None:
        s = self.settings
        attempt = 0
        while not self._stopping.is_set() and not slot.retired:
            if self.paused is not None:
                await self._resumed.wait()
                attempt = 0
                continue
            registrations = slot.registrations
            try:
                await slot.serve()
            except asyncio.CancelledError:
                # stop() cancels the calls; anything else cancelling us must propagate.
                if self._stopping.is_set() or slot.retired:
                    return
                if not slot.pausing or self._closing:
                    raise  # else pause() ended the call (a call cancelled here raises this)
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
            if slot.pausing:
                await slot.unregistered()
                continue  # ended by pause(): no reconnect to count
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

    # -- not taking work while the compute side cannot serve (no live pool actor)

    def pause(self, reason: str) -> None:
        """Stop taking work: every slot drains its session like an UNBIND and ends its
        registration, so that the queue manager hands the work to other workers;
        none registers again until :meth:`resume`."""
        if self.paused is not None or self._stopping.is_set():
            return
        self.paused = reason
        self._resumed.clear()
        log.warning("not taking work: logical workers unregister", extra=fields(reason=reason))
        for slot in self.slots:
            task = None if slot.retired else slot.unregister(self.settings.drain_timeout_s)
            if task is not None:
                self._pausing.add(task)
                task.add_done_callback(self._pausing.discard)

    def resume(self) -> None:
        """Take work again after :meth:`pause`: every slot registers."""
        if self.paused is not None:
            log.info("taking work again: logical workers register", extra=fields(was=self.paused))
            self.paused = None
            self._resumed.set()

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
        self._resumed.set()  # slots waiting to register again see the stop
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
