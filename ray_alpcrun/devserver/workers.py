"""Connection records: registered workers (``WorkerUpdate``), their session
streams (``WorkerStream``) and client streams (``ClientStream``).

Plain records with an ``asyncio.Event`` or queue to wake the gRPC handler
that owns them; the rules live in ``core``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ray_alpcrun.types import Instruction, WorkerStatus

if TYPE_CHECKING:
    from ray_alpcrun.devserver.sessions import Pending, SessionState


@dataclass(eq=False)
class Worker:
    """A registration: one open ``WorkerUpdate`` stream.

    ``eligible`` means the worker may be sent BIND: it is unbound and has reported
    IDLE since its last UNBIND (or can no longer report, see ``core``).
    """

    id: str
    node: str
    pod: str
    outbox: asyncio.Queue[Instruction | None] = field(default_factory=asyncio.Queue)
    status: WorkerStatus | None = None
    bound: SessionState | None = None
    bound_at_s: float = 0.0
    last_activity_s: float = 0.0
    eligible: bool = False
    reports_closed: bool = False  # the worker half-closed WorkerUpdate
    preempted: bool = False  # unbound to make room; awaiting its IDLE
    streams: dict[str, StreamConn] = field(default_factory=dict)  # session id -> stream

    def __repr__(self) -> str:
        return f"Worker({self.id} {self.node}/{self.pod})"


@dataclass(eq=False)
class StreamConn:
    """One open ``WorkerStream``: the worker's batches in flight for one session.

    ``draining``: the worker was unbound; no new batches, the stream ends once the
    ones in flight are answered. ``closed``: end now (in-flight batches are
    handled by whoever closed it).
    """

    worker: Worker
    session: SessionState
    inflight: dict[str, Pending] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    closed: bool = False
    peer_done: bool = False  # the worker half-closed: no more results will come
    failure: BaseException | None = None

    def __hash__(self) -> int:
        return id(self)


@dataclass(eq=False)
class ClientConn:
    """One open ``ClientStream``; results of every session it attached to flow to it."""

    sessions: list[SessionState] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    half_closed: bool = False
    orphaned: bool = False  # every session it was attached to has been closed
    failure: BaseException | None = None
    next_index: int = 0  # round robin over sessions

    def __hash__(self) -> int:
        return id(self)


class WorkerRegistry:
    """Registered workers by id and by (node, pod); eligible ones in arrival order."""

    def __init__(self) -> None:
        self.by_id: dict[str, Worker] = {}
        self._by_place: dict[tuple[str, str], dict[str, Worker]] = {}
        self.eligible: dict[str, Worker] = {}

    def add(self, worker: Worker) -> None:
        self.by_id[worker.id] = worker
        self._by_place.setdefault((worker.node, worker.pod), {})[worker.id] = worker

    def remove(self, worker: Worker) -> None:
        self.by_id.pop(worker.id, None)
        self.eligible.pop(worker.id, None)
        place = self._by_place.get((worker.node, worker.pod))
        if place is not None:
            place.pop(worker.id, None)
            if not place:
                del self._by_place[(worker.node, worker.pod)]

    def set_eligible(self, worker: Worker, eligible: bool) -> None:
        worker.eligible = eligible
        if eligible:
            self.eligible[worker.id] = worker
        else:
            self.eligible.pop(worker.id, None)

    def at_place(self, node: str, pod: str) -> list[Worker]:
        """Workers registered from (node, pod), newest first."""
        return list(reversed(self._by_place.get((node, pod), {}).values()))
