"""Shared data, fetched from the node cache once per (session, update level) per bridge.

Concurrent batches that need the same level wait on one fetch. The bytes are
handed to the processor once (on Ray: one ``ray.put``) and batches carry the
resulting handle. When a session moves to a higher level the older handles are
dropped, so a long session holds one copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ray_alpcrun import errors
from ray_alpcrun.logs import fields
from ray_alpcrun.types import SharedData

log = logging.getLogger(__name__)

Fetch = Callable[[str, int | None], Awaitable[SharedData]]
Share = Callable[[str, int | None, bytes], Awaitable[Any]]


class SharedDataCache:
    def __init__(
        self, fetch: Fetch, share: Share, attempts: int = 4, first_pause_s: float = 0.25
    ) -> None:
        self._fetch = fetch
        self._attempts = attempts
        self._first_pause_s = first_pause_s
        self._share = share
        self._entries: dict[tuple[str, int | None], asyncio.Future[Any]] = {}
        self.fetches = 0
        self.fetched_bytes = 0

    async def get(self, session_id: str, level: int | None) -> Any:
        """The processor's handle for the session's shared data at ``level``.

        ``level=None`` (the batch names no level) means the latest level at the
        first such request; it is then reused for the session, like a named level.
        """
        key = (session_id, level)
        entry = self._entries.get(key)
        if entry is None:
            entry = asyncio.get_running_loop().create_future()
            self._entries[key] = entry
            try:
                handle = await self._load(session_id, level)
            except BaseException as exc:
                del self._entries[key]
                entry.set_exception(exc)
                entry.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            entry.set_result(handle)
            self._drop_older(session_id, level)
        return await asyncio.shield(entry)

    async def _load(self, session_id: str, level: int | None) -> Any:
        pause_s = self._first_pause_s
        for attempt in range(1, self._attempts + 1):
            try:
                data = await self._fetch(session_id, level)
                break
            except errors.RpcError as exc:
                # A restarting node cache is worth a short wait; a missing level is not.
                if isinstance(exc, errors.UnavailableError) and attempt < self._attempts:
                    await asyncio.sleep(pause_s)
                    pause_s *= 2
                    continue
                wanted = "latest level" if level is None else f"level {level}"
                raise errors.SharedDataUnavailable(
                    f"shared data for session {session_id} ({wanted}) unavailable from the "
                    f"node cache: {exc.code}: {exc.details}"
                ) from exc
        self.fetches += 1
        self.fetched_bytes += len(data.payload)
        served = data.update_level if data.update_level is not None else level
        log.info(
            "shared data fetched",
            extra=fields(session=session_id, level=served, bytes=len(data.payload)),
        )
        return await self._share(session_id, served, data.payload)

    def _drop_older(self, session_id: str, level: int | None) -> None:
        if level is None:
            return
        for key in [
            k
            for k in self._entries
            if k[0] == session_id and k[1] is not None and k[1] < level and self._entries[k].done()
        ]:
            del self._entries[key]

    def forget(self, session_id: str) -> None:
        """Drop every level of a session (it ended on this bridge)."""
        for key in [k for k in self._entries if k[0] == session_id]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
