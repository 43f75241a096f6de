"""A session's end on every live actor of a pool, bounded: what
:meth:`~ray_alpcrun.pool.dispatch.Dispatcher.end_session` does.

An actor runs a session's end hook under its handler's lock. A hung task holds
that lock for ever when its caller gave up on it (its stream broke, the batch
was cancelled, so no task timeout fired), and the session's next batches wait
for the end: issue 23's chaos run stalled so (seed 104, 528 tasks unanswered).
With a task timeout, an actor that does not answer within its wait is taken as
hung and replaced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from ray_alpcrun.errors import ActorLost
from ray_alpcrun.logs import fields
from ray_alpcrun.pool.interfaces import Calls, Member, Roster

log = logging.getLogger(__name__)

A = TypeVar("A")

# A session end may take this long on an actor, plus the task timeout for every
# task in flight there, before the actor is taken as hung (with a task timeout).
END_WAIT_MIN_S = 10.0


class _NotAnswered(Exception):
    pass


async def end_everywhere(
    roster: Roster[A],
    backend: Calls[A],
    session_id: str,
    wait_s: Callable[[Member[A]], float | None],
) -> None:
    """End ``session_id`` on every live member; dead ones forget it anyway."""
    members = roster.members()

    async def end_on(member: Member[A]) -> None:
        limit_s = wait_s(member)
        try:
            await asyncio.wait_for(backend.end_session(member.actor, session_id), limit_s)
        except asyncio.TimeoutError as exc:
            raise _NotAnswered(f"{limit_s:g}") from exc

    done = await asyncio.gather(*(end_on(m) for m in members), return_exceptions=True)
    for m, result in zip(members, done, strict=True):
        if isinstance(result, ActorLost):
            roster.lost(m, f"lost during session end: {result}")
        elif isinstance(result, _NotAnswered):
            log.warning(
                "session end not answered; replacing the actor",
                extra=fields(session=session_id, actor=m.index, after_s=str(result)),
            )
            roster.lost(m, "session end not answered (hung)", killed=True)
        elif isinstance(result, Exception):
            log.warning(
                "session end failed on an actor",
                extra=fields(session=session_id, actor=m.index, error=str(result)),
            )
