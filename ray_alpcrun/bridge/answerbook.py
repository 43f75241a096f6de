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
``max_entries`` entries) are kept, oldest first.

With a bridge on every node the batch comes back to another node as often as to
its own. So a node bridge publishes the keys of the batches whose delivery ended
unanswered (:meth:`AnswerBook.take_published`: the coordinator carries them to the
other node bridges on its next poll), the others :meth:`AnswerBook.learn` where
each is, and a delivery of such a batch there asks the holder first (``fetch``: a
Ray call in the node bridge; the holder answers once its computation ends),
running the batch only if the holder has nothing (gone, evicted, failed). No gRPC,
no Ray.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ray_alpcrun.runtime import Outcome
from ray_alpcrun.types import Batch

KEEP_S = 120.0
MAX_ENTRIES = 4096
MAX_BYTES = 64 << 20

Key = tuple[str, str, bytes]
# Asks ``holder`` (a peer bridge) for the outcomes it keeps under ``key``: None if none.
Fetch = Callable[[Any, Key], Awaitable[list[Outcome] | None]]


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
        self.fetch: Fetch | None = None  # set by a node bridge: ask a peer first
        self._published: list[Key] = []  # deliveries ended unanswered, for the peers
        self._elsewhere: OrderedDict[Key, tuple[Any, float]] = OrderedDict()  # holder, since

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
        held = self._elsewhere.pop(key, None)
        if held is not None and self.fetch is not None:
            compute = self._asking(held[0], key, compute)
        task = asyncio.ensure_future(compute())
        self._running[key] = _Entry(task)
        task.add_done_callback(lambda done: self._finished(key, done))
        self._expire()
        return task, False

    def sent(self, key: Key) -> None:
        """The answer of ``key`` reached the queue manager: nothing more to keep."""
        self._drop(key)

    def orphaned(self, key: Key) -> None:
        """A delivery of ``key`` ended unanswered (its stream broke): the queue
        manager delivers it again, maybe elsewhere, often before it finished here
        (within 2 s of a link cut): publish it at once."""
        if (key in self._kept or key in self._running) and len(self._published) < self.max_entries:
            self._published.append(key)

    def take_published(self) -> list[Key]:
        """The keys kept unsent since the last call, for the other bridges."""
        out, self._published = self._published, []
        return out

    def learn(self, keys: Iterable[Key], holder: Any) -> None:
        """``holder`` keeps the outcomes of ``keys``: ask it when one comes here."""
        now = self._clock()
        for key in keys:
            self._elsewhere[key] = (holder, now)
            self._elsewhere.move_to_end(key)
        while len(self._elsewhere) > self.max_entries:
            self._elsewhere.popitem(last=False)

    async def outcomes(self, key: Key) -> list[Outcome] | None:
        """The outcomes of ``key`` (for a peer's ``fetch``): kept, or once its
        computation here ends; None if there is none, or it failed."""
        entry = self._running.get(key) or self._kept.get(key)
        if entry is None:
            return None
        try:
            return await asyncio.shield(entry.work)
        except Exception:
            return None

    def _asking(
        self, holder: Any, key: Key, compute: Callable[[], Awaitable[list[Outcome]]]
    ) -> Callable[[], Awaitable[list[Outcome]]]:
        fetch = self.fetch
        assert fetch is not None  # work() checked

        async def asking() -> list[Outcome]:
            got = await fetch(holder, key)
            return got if got is not None else await compute()

        return asking

    def forget(self, session_id: str) -> None:
        """The session was released here: its batches will not come back."""
        for key in [k for k in (*self._running, *self._kept) if k[0] == session_id]:
            self._drop(key, cancel=True)
        for key in [k for k in self._elsewhere if k[0] == session_id]:
            del self._elsewhere[key]

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
        while self._elsewhere:
            key, (_, since) = next(iter(self._elsewhere.items()))
            if now - since <= self.keep_s:
                break
            del self._elsewhere[key]
        while self._kept:
            key, oldest = next(iter(self._kept.items()))
            too_many = len(self) > self.max_entries or self._bytes > self.max_bytes
            if not too_many and now - oldest.kept_at_s <= self.keep_s:
                break
            self._drop(key)
        while len(self._running) > self.max_entries:
            # Still running: it stays with the deliveries awaiting it, unshared.
            self._drop(next(iter(self._running)))
