"""Waiting rooms for the dispatcher: :class:`Line` (first come, first served,
woken one at a time), :class:`Crowd` (woken all together) and :class:`Claims`
(what a group holds, and who waits for it). Pure asyncio.

A :class:`Line` is what keeps a wake-up O(1) (issue 18): with 2,560 batches
waiting for room on an actor, a completed call wakes the first of them only,
instead of every one re-checking the pool (which cost 0.64 ms of dispatch CPU
per batch with 2,000 waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Place:
    """A waiter's place in a :class:`Line`, kept until it leaves."""

    __slots__ = ("turn",)

    def __init__(self, turn: asyncio.Future[None]) -> None:
        self.turn = turn


class Line:
    """Waiters in arrival order. :meth:`wake` gives the first waiter that is not
    woken yet its turn; a waiter whose turn came and who finds no room waits
    again in the same place, and room that a later waiter finds goes to the
    head first (:meth:`first`). Usage::

        place = line.join()
        try:
            while not (room() and line.first(place)):
                await line.wait(place, timeout_s=5.0)
        finally:
            line.leave(place)  # a turn it got and did not use goes to the next
    """

    def __init__(self) -> None:
        # An OrderedDict: O(1) to join at the end and to leave from anywhere.
        self._places: OrderedDict[Place, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._places)

    def first(self, place: Place) -> bool:
        """Whether ``place`` is at the head of the line; if not, the head gets its
        turn (unless it has it): room that ``place`` found goes to it first."""
        head = next(iter(self._places), None)
        if head is not None and head is not place and not head.turn.done():
            head.turn.set_result(None)
        return head is place

    def join(self) -> Place:
        place = Place(asyncio.get_running_loop().create_future())
        self._places[place] = None
        return place

    async def wait(self, place: Place, timeout_s: float | None = None) -> None:
        """Return at ``place``'s turn, or after ``timeout_s``."""
        if place.turn.done():
            place.turn = asyncio.get_running_loop().create_future()
        await _within(place.turn, timeout_s)

    def leave(self, place: Place) -> None:
        """Leave the line; a turn that came and was not used goes to the next."""
        self._places.pop(place, None)
        if place.turn.done() and not place.turn.cancelled():
            self.wake()
        else:
            place.turn.cancel()

    def wake(self) -> None:
        """Give the first waiter not woken yet its turn (those before it are woken
        and about to look: a handful at most)."""
        for place in self._places:
            if not place.turn.done():
                place.turn.set_result(None)
                return

    def wake_all(self) -> None:
        for place in self._places:
            if not place.turn.done():
                place.turn.set_result(None)


class Crowd:
    """Waiters woken all together, in the order they came (as an ``asyncio.Event``
    wakes its waiters): few of them, or each able to go on."""

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Future[None], None] = {}

    def wake_all(self) -> None:
        _wake(self._waiting)

    @staticmethod
    async def wait_any(crowds: Sequence[Crowd]) -> None:
        """Return when any of ``crowds`` is woken."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for crowd in crowds:
            crowd._waiting[woken] = None
        try:
            await woken
        finally:
            for crowd in crowds:
                crowd._waiting.pop(woken, None)


class Claims(Generic[T]):
    """What a group of waiters holds (``held``), and those of them waiting for
    one of its items to be released."""

    def __init__(self) -> None:
        self.held: set[T] = set()
        self.waiters = Crowd()

    def release(self, item: T) -> None:
        self.held.discard(item)
        self.waiters.wake_all()


async def _within(waiter: asyncio.Future[None], timeout_s: float | None) -> None:
    if timeout_s is None:
        await waiter
        return
    with contextlib.suppress(asyncio.TimeoutError):  # the caller finds its deadline passed
        await asyncio.wait_for(waiter, timeout_s)


def _wake(waiters: dict[asyncio.Future[None], None]) -> None:
    for waiter in list(waiters):
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()
