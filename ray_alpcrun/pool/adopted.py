"""The roster of a node bridge: actors another process (the coordinator) owns and
hands over, one at a time. Pure asyncio and no Ray.

The coordinator's :class:`~ray_alpcrun.pool.membership.Membership` decides which
actors the pool has and replaces the lost ones; a node bridge serves the members
on its own node. :class:`AdoptedRoster` is what that node bridge's dispatcher
sees as its :class:`~ray_alpcrun.pool.interfaces.Roster`: members are adopted and
forgotten on the coordinator's word, and a member that dies or hangs here is
reported to the coordinator (``report_lost``), which kills and replaces it
(wherever Ray places the replacement).

Decision (issue 18's rule, per node): with no live member for longer than
``grace_s``, the roster is *unavailable*, so that the node bridge stops taking
work and the queue manager hands its sessions to bridges that have actors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ray_alpcrun.logs import fields
from ray_alpcrun.pool.interfaces import (
    CLOSED,
    SERVING,
    UNAVAILABLE,
    WAITING,
    Availability,
    Listener,
    Listeners,
    Member,
)

log = logging.getLogger(__name__)

A = TypeVar("A")

# (member, reason): a member died or hung here; the coordinator replaces it.
ReportLost = Callable[[Member[Any], str], None]


class AdoptedRoster(Generic[A]):
    """Members handed over by their owner; see the module docstring.

    >>> roster = AdoptedRoster(report_lost=lambda member, why: None)  # doctest: +SKIP
    >>> roster.adopt(0, actor)                                          # doctest: +SKIP
    """

    def __init__(self, report_lost: ReportLost, *, grace_s: float = 60.0) -> None:
        self._report = report_lost
        self._grace_s = grace_s
        self._members: dict[int, Member[A]] = {}
        self._listeners = Listeners()
        self._closed = False
        self._no_live_since: float | None = asyncio.get_running_loop().time()
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def members(self) -> list[Member[A]]:
        return [m for m in self._members.values() if m.alive]

    @property
    def pending(self) -> int:
        return 0  # actors asked for are the coordinator's; they join by adopt()

    def indices(self) -> list[int]:
        """The pool indices of the live members, sorted."""
        return sorted(i for i, m in self._members.items() if m.alive)

    def availability(self) -> Availability:
        live = len(self.members())
        if self._closed:
            return Availability(CLOSED, "the node bridge is closed")
        if live:
            return Availability(SERVING, f"{live} actor(s) live on this node", live=live)
        now = asyncio.get_running_loop().time()
        since = self._no_live_since if self._no_live_since is not None else now
        no_live_s = now - since
        if no_live_s >= self._grace_s:
            why = (
                f"no live actor on this node for {no_live_s:.1f} s (more than "
                f"{self._grace_s:g} s): not taking work until one is handed over"
            )
            return Availability(UNAVAILABLE, why, no_live_s=no_live_s)
        why = "no live actor on this node; batches wait for one"
        return Availability(WAITING, why, no_live_s=no_live_s)

    def watch(self, listener: Listener) -> Callable[[], None]:
        return self._listeners.add(listener)

    def lost(self, member: Member[A], reason: str, *, killed: bool = False) -> None:
        if killed:
            member.killed = True
        if not member.alive:
            return
        member.alive = False
        if self._members.get(member.index) is member:
            del self._members[member.index]
        log.warning("actor lost on this node", extra=fields(actor=member.index, reason=reason))
        self._report(member, reason)
        self._changed()

    def adopt(self, index: int, actor: A) -> Member[A]:
        """Serve ``actor`` as pool member ``index`` (a replacement takes the index over)."""
        old = self._members.get(index)
        if old is not None:
            old.alive = False
        now = asyncio.get_running_loop().time()
        member = Member(actor, index, idle_since=now)
        self._members[index] = member
        self._changed()
        return member

    def forget(self, index: int) -> Member[A] | None:
        """Stop serving member ``index`` (released, or lost elsewhere); returns it."""
        member = self._members.pop(index, None)
        if member is not None:
            member.alive = False
            self._changed()
        return member

    def close(self) -> None:
        self._closed = True
        for member in self._members.values():
            member.alive = False
        self._members.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._changed()

    def _changed(self) -> None:
        if self.members():
            self._no_live_since = None
        elif self._no_live_since is None:
            self._no_live_since = asyncio.get_running_loop().time()
        self._arm()
        state = self.availability()
        self._listeners.notify(state)

    def _arm(self) -> None:
        """Tell the listeners when the grace runs out (a change with no event of its own)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed or self._no_live_since is None:
            return
        loop = asyncio.get_running_loop()
        left_s = self._no_live_since + self._grace_s - loop.time()
        if left_s >= 0:
            self._timer = loop.call_later(left_s + 1e-3, self._changed)
