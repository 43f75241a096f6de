"""Shared data, fetched from the node cache once per (session, update level).

Used by the bridge (handles are object-store references) and by the reference
worker (handles carry the bytes). Concurrent batches that need the same level
wait on one load. The load is a task this cache owns: a batch that is
cancelled while it waits (its stream broke) cancels only its own wait, never
the load the other batches wait on.

* A batch that names a level gets exactly that level, older or newer than
  what was seen before.
* A batch that names no level gets the latest level the cache serves: that
  answer is re-asked every ``latest_refresh_s`` (5 s by default), sooner when
  the cache's ``ttl`` is shorter. A ``ttl`` says how long the data may be
  kept, not that no newer level comes meanwhile (a 600 s ``ttl`` kept batches
  on the old level for 10 minutes). When the answer is the level already
  held, its handle is kept: the compute side neither gets nor decodes a
  second copy (the payload still comes over the wire: ``GetSharedData`` has
  no way to ask only for the level).
* Every entry of a named level expires with the ``ttl`` the cache returned;
  at most ``max_entries`` are kept (least recently used dropped first).
* A node cache that does not answer (UNAVAILABLE: restarting, or its link down
  for a few seconds) is asked again, pauses doubling up to ``max_pause_s``, for
  ``unavailable_wait_s`` (15 s) before the batches waiting are answered dead:
  four tries in 1.75 s dead-lettered every batch that needed data during a 2 s
  outage of the node cache (issue 23's chaos run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ray_alpcrun import errors
from ray_alpcrun.logs import fields
from ray_alpcrun.types import SharedData

log = logging.getLogger(__name__)

Fetch = Callable[[str, int | None], Awaitable[SharedData]]
Share = Callable[[str, int | None, bytes], Awaitable[Any]]

DEFAULT_MAX_ENTRIES = 32
DEFAULT_LATEST_REFRESH_S = 5.0
DEFAULT_UNAVAILABLE_WAIT_S = 15.0


@dataclass
class _Entry:
    load: asyncio.Task[Any]
    expires_at: float = float("inf")
    served: int | None = None  # the level the cache answered with (for "latest")


class SharedDataCache:
    def __init__(
        self,
        fetch: Fetch,
        share: Share,
        attempts: int | None = None,
        first_pause_s: float = 0.25,
        *,
        unavailable_wait_s: float = DEFAULT_UNAVAILABLE_WAIT_S,
        max_pause_s: float = 2.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        latest_refresh_s: float = DEFAULT_LATEST_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._attempts = attempts  # None: as many as fit in unavailable_wait_s
        self._first_pause_s = first_pause_s
        self._unavailable_wait_s = unavailable_wait_s
        self._max_pause_s = max_pause_s
        self._share = share
        self._max_entries = max_entries
        self._latest_refresh_s = latest_refresh_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int | None], _Entry] = OrderedDict()
        self.fetches = 0
        self.fetched_bytes = 0
        self.levels_shared = 0
        """(session, level) pairs handed to the compute side (each is decoded there)."""

    async def get(self, session_id: str, level: int | None) -> Any:
        """The share's handle for the session's shared data at ``level``
        (``None``: the latest level the cache serves)."""
        key = (session_id, level)
        entry = self._entries.get(key)
        held: tuple[int, Any] | None = None  # (level, handle) a refresh of "latest" may keep
        if entry is not None and (entry.load.done() and self._clock() >= entry.expires_at):
            del self._entries[key]
            if entry.served is not None and _succeeded(entry.load):
                held = (entry.served, entry.load.result())
            entry = None
        if entry is None:
            task = asyncio.get_running_loop().create_task(
                self._load(key, held), name=f"shared-{session_id}-{level}"
            )
            entry = self._entries[key] = _Entry(task)
            task.add_done_callback(partial(self._loaded, key))
            self._bound()
        else:
            self._entries.move_to_end(key)
        # shield: a cancelled waiter leaves the load running for the others.
        return await asyncio.shield(entry.load)

    async def _load(self, key: tuple[str, int | None], held: tuple[int, Any] | None) -> Any:
        session_id, level = key
        pause_s = self._first_pause_s
        give_up_at = self._clock() + self._unavailable_wait_s
        attempt = 0
        while True:
            attempt += 1
            try:
                data = await self._fetch(session_id, level)
                break
            except errors.RpcError as exc:
                # A restarting node cache is worth a wait; a missing level is not.
                more = self._attempts is None or attempt < self._attempts
                if isinstance(exc, errors.UnavailableError) and more:
                    left_s = give_up_at - self._clock()
                    if left_s > 0:
                        await asyncio.sleep(min(pause_s, left_s))
                        pause_s = min(2 * pause_s, self._max_pause_s)
                        continue
                wanted = "latest level" if level is None else f"level {level}"
                raise errors.SharedDataUnavailable(
                    f"shared data for session {session_id} ({wanted}) unavailable from the "
                    f"node cache: {exc.code}: {exc.details}"
                ) from exc
        self.fetches += 1
        self.fetched_bytes += len(data.payload)
        served = data.update_level if data.update_level is not None else level
        ttl_s = data.ttl_s if data.ttl_s else None
        if level is None:
            # "latest" must follow the cache, however long the data may be kept.
            ttl_s = min(ttl_s or self._latest_refresh_s, self._latest_refresh_s)
        entry = self._entries.get(key)
        if entry is not None:
            entry.served = served
            if ttl_s is not None:
                entry.expires_at = self._clock() + ttl_s
        if held is not None and held[0] == served:
            return held[1]  # no newer level: the compute side keeps what it has
        named = self._entries.get((session_id, served)) if level is None else None
        if named is not None and _succeeded(named.load):
            return named.load.result()  # a batch named this level: one handle for both
        log.info(
            "shared data fetched",
            extra=fields(session=session_id, level=served, bytes=len(data.payload), ttl_s=ttl_s),
        )
        self.levels_shared += 1
        return await self._share(session_id, served, data.payload)

    def _loaded(self, key: tuple[str, int | None], task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            failed = True
        else:
            exc = task.exception()  # retrieved here, so never "never retrieved"
            failed = exc is not None
            if exc is not None:
                log.warning("shared data load failed", extra=fields(key=key, error=str(exc)))
        entry = self._entries.get(key)
        # forget() or expiry may have replaced or dropped the entry meanwhile.
        if failed and entry is not None and entry.load is task:
            del self._entries[key]

    def _bound(self) -> None:
        while len(self._entries) > self._max_entries:
            oldest = next(iter(self._entries))
            # Waiters hold the task itself; dropping the entry only ends the caching.
            del self._entries[oldest]

    def forget(self, session_id: str) -> None:
        """Drop every level of a session (it ended here). Loads under way finish
        for the batches waiting on them and are not cached."""
        for key in [k for k in self._entries if k[0] == session_id]:
            del self._entries[key]

    async def close(self) -> None:
        """Cancel the loads under way (the owner stops)."""
        tasks = [e.load for e in self._entries.values()]
        self._entries.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def level_max(self) -> int:
        """The highest update level held for any session (0 when none is)."""
        levels = [e.served for e in self._entries.values() if e.served is not None]
        return max(levels, default=0)

    def __len__(self) -> int:
        return len(self._entries)


def _succeeded(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
