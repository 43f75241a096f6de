"""Merging the sub-batches queued for one actor into fewer calls.

A Ray actor call costs about half a millisecond of CPU (submit, reply, task
execution) whatever it carries; for cheap tasks in batches of ~100 that is more
than the tasks themselves. The bridge keeps many batches in flight, so while an
actor is busy more sub-batches for it queue up. :class:`Coalescer` keeps at most
``max_outstanding`` calls in flight per actor and sends everything that queued
meanwhile as ONE call when one comes back. Parts that are worth a call of their
own (``worth_a_call``: e.g. enough measured work that the actor should find them
waiting) go out at once, beside the calls in flight.

Each sub-batch still gets its own reply (or the call's exception), so callers,
retries and timeouts work per sub-batch exactly as with one call each. Pure
asyncio, no Ray: the sending functions are injected.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")  # one sub-batch's call arguments
R = TypeVar("R")  # one sub-batch's reply
H = TypeVar("H")  # an actor (handle)

SendOne = Callable[[H, P], Awaitable[R]]
SendMany = Callable[[H, list[P]], Awaitable[list[R]]]
WorthACall = Callable[[list[P]], bool]


@dataclass
class _Lane(Generic[P, R]):
    outstanding: int = 0
    pending: list[tuple[P, asyncio.Future[R]]] = field(default_factory=list)


class Coalescer(Generic[H, P, R]):
    """``await call(actor, key, part)``: the reply to ``part``, sent alone or merged.

    ``send_one(actor, part)`` makes a call for one part; ``send_many(actor, parts)``
    one call for several, answering one reply per part in order. An exception
    from either is raised to every part of that call.
    """

    def __init__(
        self,
        send_one: SendOne[H, P, R],
        send_many: SendMany[H, P, R],
        max_outstanding: int = 2,
        worth_a_call: WorthACall[P] | None = None,
    ) -> None:
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        self._send_one = send_one
        self._send_many = send_many
        self._max = max_outstanding
        self._worth = worth_a_call
        self._lanes: dict[Hashable, _Lane[P, R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.calls = 0
        """Calls made so far (for tests and statistics)."""

    async def call(self, actor: H, key: Hashable, part: P) -> R:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        lane.pending.append((part, future))
        if self._due(lane):
            self._flush(actor, key, lane)
        return await future

    def _due(self, lane: _Lane[P, R]) -> bool:
        """Whether ``lane``'s queued parts should be sent now."""
        if lane.outstanding < self._max:
            return True
        return self._worth is not None and self._worth([p for p, _ in lane.pending])

    def forget(self, key: Hashable) -> None:
        """Drop an actor's lane (it was killed); calls already made still answer."""
        self._lanes.pop(key, None)

    async def close(self) -> None:
        """Cancel the calls in flight (their parts' callers see the cancellation)
        and the parts still queued, and wait until the calls' tasks ended."""
        self._closed = True
        for lane in self._lanes.values():
            self._flush_closed(lane)
        self._lanes.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _flush_closed(lane: _Lane[P, R]) -> None:
        for _, future in lane.pending:
            future.cancel()
        lane.pending = []

    def _flush(self, actor: H, key: Hashable, lane: _Lane[P, R]) -> None:
        if self._closed:  # also a forgotten lane, flushed when its last call ends
            self._flush_closed(lane)
            return
        # Parts whose caller gave up (timeout, cancellation) are not sent.
        batch = [(p, f) for p, f in lane.pending if not f.done()]
        lane.pending = []
        if not batch:
            return
        lane.outstanding += 1
        self.calls += 1
        task = asyncio.ensure_future(self._send(actor, key, lane, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        actor: H,
        key: Hashable,
        lane: _Lane[P, R],
        batch: list[tuple[P, asyncio.Future[R]]],
    ) -> None:
        try:
            if len(batch) == 1:
                replies = [await self._send_one(actor, batch[0][0])]
            else:
                replies = await self._send_many(actor, [p for p, _ in batch])
                if len(replies) != len(batch):
                    raise RuntimeError(f"{len(replies)} replies for {len(batch)} sub-batches")
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        finally:
            lane.outstanding -= 1
            if lane.pending and self._due(lane):
                self._flush(actor, key, lane)
