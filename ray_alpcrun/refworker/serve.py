"""Serving one bound session on its ``WorkerStream``: answer task batches one
after the other, and wind down cleanly on UNBIND.

On UNBIND the worker keeps answering what the queue manager already sent it
(a draining queue manager sends nothing new and ends the stream once those are
answered). When nothing arrives for ``unbind_grace_s`` the worker half-closes
itself, so a queue manager that waits for the worker's half-close is served
too; batches arriving after that stay unanswered and are re-queued there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from ray_alpcrun.types import Batch

log = logging.getLogger(__name__)

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
_WAKE = object()  # re-check the unbind state


class SessionServer:
    """The serving loop of one session; ``run`` returns when the stream ended."""

    def __init__(
        self,
        session_id: str,
        call: Any,
        answer: Callable[[Batch], Awaitable[list[Batch]]],
        unbind_grace_s: float,
        drain_timeout_s: float,
    ) -> None:
        self.session_id = session_id
        self.call = call
        self._answer = answer
        self._grace_s = unbind_grace_s
        self._drain_s = drain_timeout_s
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.unbinding = False
        self.half_closed = False
        self.abandoned = False  # cancelled without answering: send nothing more
        self.dropped_batches = 0
        self.undecodable_batches = 0
        self.ended = asyncio.Event()  # the stream ended or broke: nothing more can be sent
        self._drain_timer: asyncio.TimerHandle | None = None

    def unbind(self) -> None:
        """Finish what was sent, then end (see the module docstring)."""
        self.unbinding = True
        self._inbox.put_nowait(_WAKE)

    def abandon(self) -> None:
        """Cancel the stream without answering, like a crash."""
        self.abandoned = True
        self.call.cancel()

    async def run(self) -> None:
        """Serve until the stream ends; raises ``grpc.RpcError`` if it broke."""
        reader = asyncio.get_running_loop().create_task(self._read())
        try:
            while True:
                item = await self._next()
                if item is EOF:
                    break
                if item is _WAKE:
                    continue
                if isinstance(item, BaseException):
                    raise item
                if not isinstance(item, Batch):
                    # grpc hands over None for a frame it could not decode; with no
                    # id it cannot be answered. The queue manager's timeout handles it.
                    self.undecodable_batches += 1
                    log.error("undecodable task batch skipped", extra={"session": self.session_id})
                    continue
                if self.half_closed:
                    self.dropped_batches += 1  # unanswered: the queue manager re-queues it
                    continue
                for part in await self._answer(item):  # one batch unless it could not fit
                    await self.call.write(part)
            await self._half_close()  # the stream ended: finish our side too
        finally:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _next(self) -> Any:
        if self.unbinding and not self.half_closed:
            try:
                return await asyncio.wait_for(self._inbox.get(), self._grace_s)
            except asyncio.TimeoutError:
                await self._half_close()
                return _WAKE
        return await self._inbox.get()

    async def _read(self) -> None:
        try:
            while True:
                batch = await self.call.read()
                self._inbox.put_nowait(batch)
                if batch is EOF:
                    return
        except grpc.RpcError as exc:
            self._inbox.put_nowait(exc)
        finally:
            self.ended.set()

    async def _half_close(self) -> None:
        if self.half_closed:
            return
        self.half_closed = True
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self.call.done_writing()
        # The queue manager ends the stream once it saw the half-close; bound the wait.
        self._drain_timer = asyncio.get_running_loop().call_later(self._drain_s, self.call.cancel)
