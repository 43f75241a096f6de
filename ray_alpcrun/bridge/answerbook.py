"""Answers kept for batches whose stream ended before they could be sent.

When a worker stream breaks (the link to the queue manager cut, a registration
aborted, a session stream ended), the queue manager re-queues what was in flight
on it and delivers it again, often to a logical worker of the same bridge. The
computation of such a batch is not thrown away: it goes on (the pool actors run
it anyway; a Ray call is not taken back) and its outcomes stay here a while,
keyed by session, batch id and task ids. A delivery of the same batch to this
bridge then joins the computation still under way, or is answered from what it
gave, instead of running the batch again and holding its delivery open the whole
time: each delivery left open is one more the next fault can cost, and the third
is dead-lettered (issue 23's outside chaos run re-queued most batches at link cuts).

Only outcomes are kept, never failures of the batch as a whole (no shared data, no
pool): those run again. An entry goes when its answer was sent, when its session
is released, after ``keep_s``, or when more than ``max_bytes`` of payloads (or
``max_entries`` entries) are kept, oldest first. No gRPC, no Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ray_alpcrun.runtime import Outcome
from ray_alpcrun.types import Batch

KEEP_S = 120.0
MAX_ENTRIES = 4096
MAX_BYTES = 64 << 20

Key = tuple[str, str, bytes]


def batch_key(session_id: str, batch: Batch) -> Key:
    """A batch as the queue manager delivers it again: same id, same tasks (a
    remainder re-queued after a partial answer keeps the id with fewer tasks, and
    so is another entry)."""
    ids = hashlib.blake2b(digest_size=16)
    for message in batch.messages:
        ids.update(message.id.encode())
        ids.update(b"\0")
    level = batch.required_shared_data_update_level if batch.use_shared_data else None
    ids.update(repr(level).encode())
    return (session_id, batch.id, ids.digest())


@dataclass
class _Entry:
    work: asyncio.Task[list[Outcome]]
    kept_at_s: float = 0.0  # when the outcomes came
    size_bytes: int = 0


class AnswerBook:
    """Computations of batches by key, shared by every delivery of the same batch
    to this bridge until one of them sent the answer."""

    def __init__(
        self,
        keep_s: float = KEEP_S,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_s = keep_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._running: dict[Key, _Entry] = {}
        self._kept: OrderedDict[Key, _Entry] = OrderedDict()  # oldest outcomes first
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._running) + len(self._kept)

    def work(
        self, key: Key, compute: Callable[[], Awaitable[list[Outcome]]]
    ) -> tuple[asyncio.Task[list[Outcome]], bool]:
        """The computation of ``key`` and whether it was here already: the one under
        way or done here, else a new one from ``compute``. Await it shielded: a
        delivery cancelled leaves it running."""
        self._expire()
        entry = self._running.get(key) or self._kept.get(key)
        if entry is not None:
            return entry.work, True
        task = asyncio.ensure_future(compute())
        self._running[key] = _Entry(task)
        task.add_done_callback(lambda done: self._finished(key, done))
        self._expire()
        return task, False

    def sent(self, key: Key) -> None:
        """The answer of ``key`` reached the queue manager: nothing more to keep."""
        self._drop(key)

    def forget(self, session_id: str) -> None:
        """The session was released here: its batches will not come back."""
        for key in [k for k in (*self._running, *self._kept) if k[0] == session_id]:
            self._drop(key, cancel=True)

    async def close(self) -> None:
        works = [entry.work for entry in (*self._running.values(), *self._kept.values())]
        for key in [*self._running, *self._kept]:
            self._drop(key, cancel=True)
        await asyncio.gather(*works, return_exceptions=True)

    def _finished(self, key: Key, task: asyncio.Task[list[Outcome]]) -> None:
        entry = self._running.get(key)
        if entry is None or entry.work is not task:
            return  # sent, forgotten or pushed out meanwhile
        del self._running[key]
        if task.cancelled() or task.exception() is not None:
            return  # a batch that failed as a whole runs again
        entry.kept_at_s = self._clock()
        entry.size_bytes = sum(
            len(payload or b"") + len(error or "") for payload, error in task.result()
        )
        self._kept[key] = entry
        self._bytes += entry.size_bytes
        self._expire()

    def _drop(self, key: Key, cancel: bool = False) -> None:
        entry = self._running.pop(key, None) or self._kept.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry.size_bytes
        if cancel and not entry.work.done():
            entry.work.cancel()

    def _expire(self) -> None:
        now = self._clock()
        while self._kept:
            key, oldest = next(iter(self._kept.items()))
            too_many = len(self) > self.max_entries or self._bytes > self.max_bytes
            if not too_many and now - oldest.kept_at_s <= self.keep_s:
                break
            self._drop(key)
        while len(self._running) > self.max_entries:
            # Still running: it stays with the deliveries awaiting it, unshared.
            self._drop(next(iter(self._running)))
