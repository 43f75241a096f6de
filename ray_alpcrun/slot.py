"""One logical worker's BIND/UNBIND state machine, shared by the bridge and the
reference worker. Imports neither gRPC nor Ray, so it can be driven by a
scripted fake in tests.

The upstream Go worker handles ``WorkerUpdate`` instructions one at a time and
blocks in ``processSession`` while it serves a session, so the queue manager
sees every instruction honoured, in order. A slot here does the same while
still reading the update stream: instructions (and the news that a session
stream ended by itself) are queued and applied strictly one after the other:

* ``BIND s``: end the stream the slot holds (finish its batches, half-close;
  at once if it already broke), then open a ``WorkerStream`` for ``s`` and
  report BUSY. A BIND for the session already served also gets a fresh stream,
  opened after the old one ended: a queue manager re-sends BIND because it
  dropped the old one (possibly before that news reached us).
* ``UNBIND s``: finish the batches in flight, half-close, report IDLE once.
  UNBIND with no session held just reports IDLE (as the guide's worker does);
  UNBIND for another session than the one held is logged and skipped.
* a stream that ends without UNBIND frees the slot and reports nothing; the
  queue manager answers with UNBIND (then IDLE is sent) or BIND.
* an instruction of a type we do not know is logged and skipped, like the
  guide's ``switch``.

Adding or removing a slot is creating or closing one :class:`SlotMachine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ray_alpcrun.logs import fields
from ray_alpcrun.types import Instruction, InstructionType, WorkerStatus

log = logging.getLogger(__name__)


class SlotStream(Protocol):
    """One open ``WorkerStream`` as the slot sees it."""

    session_id: str
    closed: asyncio.Event  # set once the stream ended, whoever ended it

    async def drain(self, timeout_s: float | None) -> object:
        """Finish the batches in flight, half-close, wait (bounded) for the end."""

    async def abort(self) -> None:
        """Cancel the stream and what is in flight, without answering."""


Opener = Callable[[str], SlotStream]
Reporter = Callable[[WorkerStatus, str], Awaitable[None]]
Releaser = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _Gone:
    stream: SlotStream


@dataclass(frozen=True, slots=True)
class _Stop:
    timeout_s: float | None
    done: asyncio.Future[None]


class SlotMachine:
    """Applies one logical worker's instructions in order (see the module docstring).

    ``open_stream(session_id)`` opens and starts a stream; ``report(status,
    session_id)`` writes a ``WorkerState``; ``release(session_id)`` is told when
    the slot stops serving a session. Feed instructions with :meth:`instruct`,
    run :meth:`run` as a task, and end with :meth:`stop` (graceful) or
    :meth:`close` (abrupt).

    >>> machine = SlotMachine(open_stream, report, name="W1")   # doctest: +SKIP
    >>> task = asyncio.create_task(machine.run())                 # doctest: +SKIP
    >>> machine.instruct(instruction)                             # doctest: +SKIP
    """

    def __init__(
        self,
        open_stream: Opener,
        report: Reporter,
        release: Releaser | None = None,
        *,
        drain_timeout_s: float | None = 30.0,
        name: str = "",
    ) -> None:
        self._open = open_stream
        self._report = report
        self._release = release or (lambda _sid: None)
        self.drain_timeout_s = drain_timeout_s
        self.name = name
        self.current: SlotStream | None = None
        self._events: asyncio.Queue[Instruction | _Stop | _Gone] = asyncio.Queue()
        self._watchers: set[asyncio.Task[None]] = set()
        self.stopped = False
        self.closed = False
        self.skipped = 0  # instructions of unknown type
        self.applied = 0  # instructions applied (for tests and logs)

    @property
    def session_id(self) -> str | None:
        return None if self.current is None else self.current.session_id

    @property
    def pending(self) -> int:
        return self._events.qsize()

    def instruct(self, instruction: Instruction) -> None:
        """Queue one decoded ``Instruction``."""
        self._events.put_nowait(instruction)

    async def stop(self, timeout_s: float | None) -> None:
        """After the instructions already queued: drain the stream held, report
        IDLE, and apply nothing more."""
        if self.closed:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._events.put_nowait(_Stop(timeout_s, done))
        await asyncio.shield(done)

    async def run(self) -> None:
        """Apply events until cancelled (then :meth:`close` is the caller's job)."""
        while True:
            event = await self._events.get()
            if isinstance(event, _Stop):
                await self._stop(event)
            elif isinstance(event, _Gone):
                await self._gone(event.stream)
            elif self.stopped:
                log.info(
                    "instruction after stop skipped",
                    extra=self._f(type=_kind(event.type), session=event.session_id),
                )
            else:
                await self._apply(event)

    async def close(self) -> None:
        """Abrupt end (the registration is gone): cancel the stream held; a
        pending :meth:`stop` returns (there is nothing left to drain)."""
        self.closed = True
        while not self._events.empty():
            event = self._events.get_nowait()
            if isinstance(event, _Stop) and not event.done.done():
                event.done.set_result(None)
        for task in self._watchers:
            task.cancel()
        self._watchers.clear()
        current, self.current = self.current, None
        if current is not None:
            await current.abort()
            self._release(current.session_id)

    async def _apply(self, instruction: Instruction) -> None:
        kind, session_id = instruction.type, instruction.session_id
        if kind == InstructionType.BIND:
            await self._end_current(drain=True)
            log.info("BIND", extra=self._f(session=session_id))
            stream = self._open(session_id)
            self.current = stream
            watcher = asyncio.create_task(self._watch(stream))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            await self._report(WorkerStatus.BUSY, session_id)
        elif kind == InstructionType.UNBIND:
            if self.current is not None and self.current.session_id != session_id:
                log.info(
                    "UNBIND for a session not served here; skipped",
                    extra=self._f(session=session_id, serving=self.current.session_id),
                )
                return
            log.info("UNBIND", extra=self._f(session=session_id))
            await self._end_current(drain=True)
            await self._report(WorkerStatus.IDLE, "")
        else:
            self.skipped += 1
            log.warning(
                "instruction of unknown type skipped",
                extra=self._f(type=kind, session=session_id),
            )
            return
        self.applied += 1

    async def _end_current(self, drain: bool) -> None:
        current = self.current
        if current is None:
            return
        try:
            if drain and not current.closed.is_set():
                await current.drain(self.drain_timeout_s)
        finally:
            await self._let_go(current)

    async def _let_go(self, current: SlotStream) -> None:
        """Abort and release ``current``, also after a drain cut short.

        The stream stays :attr:`current` until it is aborted: should the runner be
        cancelled here too, :meth:`close` still finds it (and aborts it again,
        which is harmless) instead of leaving its reader, its call and the
        session's state on the actors behind.
        """
        # A broken stream cannot carry results: cancel what is still in flight.
        await current.abort()
        if self.current is current:
            self.current = None
        self._release(current.session_id)

    async def _watch(self, stream: SlotStream) -> None:
        await stream.closed.wait()
        self._events.put_nowait(_Gone(stream))

    async def _gone(self, stream: SlotStream) -> None:
        if stream is not self.current:
            return  # already replaced or drained on purpose
        log.warning(
            "session stream ended without UNBIND; slot free, awaiting instructions",
            extra=self._f(session=stream.session_id),
        )
        await self._end_current(drain=False)

    async def _stop(self, event: _Stop) -> None:
        try:
            if not self.stopped:
                self.stopped = True
                current = self.current
                if current is not None:
                    try:
                        with contextlib.suppress(Exception):
                            await current.drain(event.timeout_s)
                    finally:
                        await self._let_go(current)
                    await self._report(WorkerStatus.IDLE, "")
        finally:
            if not event.done.done():
                event.done.set_result(None)

    def _f(self, **extra: object) -> dict[str, object]:
        return fields(worker=self.name, **extra)


def _kind(kind: int) -> str:
    """An instruction type as the protocol names it (``UNBIND``), or its number if unknown."""
    try:
        return InstructionType(kind).name
    except ValueError:
        return str(kind)
