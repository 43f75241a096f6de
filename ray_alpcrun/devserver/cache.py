"""The ``Cache`` service: versioned shared data per session, served by the
central cache and by a node cache that reads through from it.

Decisions (the docs are silent):

* Entries are keyed by (session id, update level). ``SetSharedData`` without
  an update level stores at the next level after the highest one the cache
  holds for the session (1 for the first). Setting an existing level
  replaces it (levels are meant to be immutable; node caches that already
  hold the old payload keep serving it until its TTL ends).
* ``ttl`` unset or zero: the entry never expires. An expired entry answers
  NOT_FOUND "... expired"; its payload is freed at once.
* ``GetSharedData`` without a level serves the highest level held that has not
  expired. The reply carries the level served and, in ``ttl``, the time left
  (unset when the entry never expires).
* The caches do not know sessions: an unknown session id is simply one with
  no shared data (NOT_FOUND).
* Node cache: a hit on (session, level) is served locally; a miss, or a
  request without a level (only the central cache knows the newest level),
  asks the central cache, and the answer is kept with the TTL it has left.
  Concurrent misses for the same key share one central call. Its
  ``SetSharedData`` writes through to the central cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.devserver.queue import checked
from ray_alpcrun.rpc import CacheStub, Context, UnaryUnaryMethod
from ray_alpcrun.types import SharedData, Status

R = TypeVar("R")

log = logging.getLogger("ray_alpcrun.devserver")


@dataclass(slots=True)
class _Entry:
    payload: bytes | None  # None once expired
    expires_at_s: float | None


class SharedDataStore:
    """Shared data by session and update level, with TTLs on an injectable clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._data: dict[str, dict[int, _Entry]] = {}

    def put(self, item: SharedData) -> int:
        """Store ``item``; returns the level it was stored at."""
        if not item.session_id:
            raise Rejected("INVALID_ARGUMENT", "SharedData.session_id is required")
        levels = self._data.setdefault(item.session_id, {})
        level = item.update_level
        if level is None:
            level = max(levels, default=0) + 1
        ttl = item.ttl_s
        expires = self._clock() + ttl if ttl else None
        levels[level] = _Entry(item.payload, expires)
        return level

    def get(self, session_id: str, level: int | None) -> SharedData:
        if not session_id:
            raise Rejected("INVALID_ARGUMENT", "SharedData.session_id is required")
        levels = self._data.get(session_id)
        if not levels:
            raise Rejected("NOT_FOUND", f"no shared data for session {session_id}")
        now = self._clock()
        if level is None:
            for candidate in sorted(levels, reverse=True):
                found = self._live(levels[candidate], now)
                if found is not None:
                    return self._reply(session_id, candidate, found, now)
            raise Rejected("NOT_FOUND", f"shared data of session {session_id} expired")
        entry = levels.get(level)
        if entry is None:
            have = ", ".join(str(k) for k in sorted(levels)) or "none"
            raise Rejected(
                "NOT_FOUND",
                f"no shared data at level {level} for session {session_id} (have: {have})",
            )
        found = self._live(entry, now)
        if found is None:
            raise Rejected(
                "NOT_FOUND", f"shared data at level {level} for session {session_id} expired"
            )
        return self._reply(session_id, level, found, now)

    @staticmethod
    def _live(entry: _Entry, now: float) -> _Entry | None:
        if entry.payload is None:
            return None
        if entry.expires_at_s is not None and now >= entry.expires_at_s:
            entry.payload = None  # free the memory, remember that it expired
            return None
        return entry

    @staticmethod
    def _reply(session_id: str, level: int, entry: _Entry, now: float) -> SharedData:
        ttl = None if entry.expires_at_s is None else max(entry.expires_at_s - now, 1e-9)
        return SharedData(session_id, level, entry.payload or b"", ttl)

    def has(self, session_id: str, level: int) -> bool:
        entry = self._data.get(session_id, {}).get(level)
        return entry is not None and self._live(entry, self._clock()) is not None

    def purge(self) -> None:
        """Free expired payloads (they are also freed when read)."""
        now = self._clock()
        for levels in self._data.values():
            for entry in levels.values():
                self._live(entry, now)


class CentralCacheServicer:
    """The central cache (:2337)."""

    def __init__(self, store: SharedDataStore) -> None:
        self.store = store
        self.get_calls = 0
        self.set_calls = 0

    async def SetSharedData(self, request: SharedData, context: Context) -> Status:
        self.set_calls += 1
        level = await checked(context, self.store.put, request)
        log.info(
            "central cache: session %s level %d set (%d bytes, ttl %s s)",
            request.session_id,
            level,
            len(request.payload),
            request.ttl_s,
        )
        return Status()

    async def GetSharedData(self, request: SharedData, context: Context) -> SharedData:
        self.get_calls += 1
        return await checked(context, self.store.get, request.session_id, request.update_level)


class NodeCacheServicer:
    """A node cache (:3337): local copies, misses read through from the central cache.

    ``upstream`` is a ``rpc.CacheStub(channel, package)`` on an asyncio
    channel to the central cache; ``metadata`` carries the API key.
    """

    def __init__(
        self, store: SharedDataStore, upstream: CacheStub, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self.store = store
        self._upstream = upstream
        self._metadata = metadata
        self._fetching: dict[tuple[str, int | None], asyncio.Future[SharedData]] = {}  # in progress
        self.get_calls = 0
        self.central_fetches = 0

    async def SetSharedData(self, request: SharedData, context: Context) -> Status:
        await self._forward(context, self._upstream.SetSharedData, request)
        if request.update_level is not None:
            self.store.put(request)
        return Status()

    async def GetSharedData(self, request: SharedData, context: Context) -> SharedData:
        self.get_calls += 1
        sid, level = request.session_id, request.update_level
        if not sid:
            await checked(context, self.store.get, sid, level)  # raises INVALID_ARGUMENT
        if level is not None and self.store.has(sid, level):
            return self.store.get(sid, level)
        try:
            return await self._fetch(sid, level)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"central cache: {exc.details()}")
            raise AssertionError("unreachable") from exc

    async def _fetch(self, sid: str, level: int | None) -> SharedData:
        """One central call per key at a time; concurrent askers share it."""
        key = (sid, level)
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_once(sid, level))
            self._fetching[key] = task
            task.add_done_callback(lambda t: self._fetched(key, t))
        return await asyncio.shield(task)

    def _fetched(self, key: tuple[str, int | None], task: asyncio.Future[SharedData]) -> None:
        self._fetching.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every asker may have gone away

    async def _fetch_once(self, sid: str, level: int | None) -> SharedData:
        reply = await self._upstream.GetSharedData(SharedData(sid, level), metadata=self._metadata)
        self.central_fetches += 1
        self.store.put(reply)
        return reply

    async def _forward(
        self, context: Context, call: UnaryUnaryMethod[SharedData, R], request: SharedData
    ) -> R:
        try:
            return await call(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), f"central cache: {exc.details()}")
            raise AssertionError("unreachable") from exc
