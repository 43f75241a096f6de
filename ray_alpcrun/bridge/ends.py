"""A session's end and its batches, in order: what a bridge's session streams
call instead of the :class:`~ray_alpcrun.bridge.session.Processor` itself.
No gRPC, no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

from ray_alpcrun.bridge.session import Processor
from ray_alpcrun.runtime import Outcome


class EndsFirst:
    """The bridge's :class:`Processor` as its session streams see it: a session's
    batches wait while an end of that session is still under way.

    An end, once sent, cannot be called back (it queues behind the sub-batches
    still running on the actors). A session bound again meanwhile is served after
    its end, as a fresh session, instead of having its state cleared under it.
    """

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self._ending: dict[str, asyncio.Future[None]] = {}

    async def share(self, session_id: str, level: int | None, payload: bytes) -> Any:
        return await self.processor.share(session_id, level, payload)

    async def process(
        self, session_id: str, payloads: list[bytes], shared: Any | None
    ) -> list[Outcome]:
        ending = self._ending.get(session_id)
        if ending is not None:
            await asyncio.shield(ending)  # a batch cancelled here leaves the end alone
        return await self.processor.process(session_id, payloads, shared)

    async def end_session(self, session_id: str) -> None:
        # Ends of one session run in order: the batches wait for the last one.
        previous = self._ending.get(session_id)
        done = self._ending[session_id] = asyncio.get_running_loop().create_future()
        try:
            if previous is not None:
                await asyncio.shield(previous)
            await self.processor.end_session(session_id)
        finally:
            done.set_result(None)
            if self._ending.get(session_id) is done:
                del self._ending[session_id]
