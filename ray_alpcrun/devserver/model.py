"""The queue manager's object graph, as plain records: sessions (their task
queue, batches in flight, results, dead letters and the counts that say
whether every task was answered), registered workers, their session streams
(``WorkerStream``) and client streams (``ClientStream``), and the table of
open, closing and closed sessions.

No gRPC, no rules: ``flow`` moves batches, ``binding`` binds workers, ``core``
drives sessions; records hold an ``asyncio.Event`` to wake the gRPC handler
that owns them.

Decisions (the docs are silent):

* Task batches are served highest ``Batch.priority`` first, FIFO within a
  priority. A batch taken back from a worker goes to the *front* of its
  priority, so it is the next one served.
* A client may reuse a batch id (e.g. resubmitting after a reconnect): the copy
  gets an internal id towards workers, and both are answered under the
  client's id.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ray_alpcrun.devserver.errors import Rejected
from ray_alpcrun.types import Batch, Instruction, SessionAttributes, WorkerStatus

_CLOSED_REMEMBERED = 10_000


@dataclass(slots=True, eq=False)
class Pending:
    """A task batch that is queued or in flight, with its delivery count.

    ``client_batch_id`` is set when the client reused the id of a batch that is
    still live: the copy travels to workers under a unique id and its results
    and dead letters go back to the client under the client's id.
    """

    batch: Batch
    deliveries: int = 0
    client_batch_id: str | None = None
    sent_at_s: float = 0.0  # when it was last handed to a worker

    @property
    def reply_id(self) -> str:
        return self.client_batch_id or self.batch.id


class TaskQueue:
    """Batches by priority (higher first), FIFO within a priority.

    Sessions use few distinct priorities, so a short sorted key list beats a heap
    and keeps FIFO order exact.
    """

    __slots__ = ("_buckets", "_order", "batches", "tasks")

    def __init__(self) -> None:
        self._buckets: dict[int, deque[Pending]] = {}
        self._order: list[int] = []  # priorities, highest first
        self.batches = 0
        self.tasks = 0

    def _bucket(self, priority: int) -> deque[Pending]:
        bucket = self._buckets.get(priority)
        if bucket is None:
            bucket = self._buckets[priority] = deque()
            self._order.append(priority)
            self._order.sort(reverse=True)
        return bucket

    def push(self, item: Pending) -> None:
        self._bucket(item.batch.priority).append(item)
        self.batches += 1
        self.tasks += len(item.batch.messages)

    def push_front(self, item: Pending) -> None:
        self._bucket(item.batch.priority).appendleft(item)
        self.batches += 1
        self.tasks += len(item.batch.messages)

    def pop(self) -> Pending | None:
        for priority in self._order:
            bucket = self._buckets[priority]
            if bucket:
                item = bucket.popleft()
                self.batches -= 1
                self.tasks -= len(item.batch.messages)
                return item
        return None

    def clear(self) -> None:
        self._buckets.clear()
        self._order.clear()
        self.batches = 0
        self.tasks = 0


@dataclass(eq=False)
class SessionState:
    """Everything the queue manager holds for one session."""

    id: str
    app_id: str
    attributes: SessionAttributes
    created_s: float
    last_activity_s: float
    tasks: TaskQueue = field(default_factory=TaskQueue)
    live: dict[str, Pending] = field(default_factory=dict)  # batch id -> queued or in flight
    inflight_batches: int = 0
    results: deque[Batch] = field(default_factory=deque)
    dead_letters: deque[Batch] = field(default_factory=deque)
    submitted_tasks: int = 0
    handed_tasks: int = 0  # result tasks handed to a client stream
    dead_tasks: int = 0
    bound: dict[str, Worker] = field(default_factory=dict)  # worker id -> worker
    streams: set[StreamConn] = field(default_factory=set)
    hungry: dict[StreamConn, None] = field(default_factory=dict)  # streams waiting for tasks
    clients: set[ClientConn] = field(default_factory=set)
    drained_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    closing: bool = False  # closed without cleanup: answers still flow to its clients

    @property
    def priority(self) -> int:
        return self.attributes.priority

    @property
    def window(self) -> int:
        return self.attributes.max_inflight_batches_per_worker

    @property
    def outstanding_batches(self) -> int:
        return self.tasks.batches + self.inflight_batches

    @property
    def unanswered_tasks(self) -> int:
        """Tasks submitted but neither handed to a client as results nor dead-lettered."""
        return self.submitted_tasks - self.handed_tasks - self.dead_tasks

    @property
    def drained(self) -> bool:
        return self.unanswered_tasks == 0

    def wants_worker(self) -> bool:
        """Queued work that another worker could take, within ``max_workers``."""
        if self.tasks.batches == 0:
            return False
        bound = len(self.bound)
        cap = self.attributes.max_workers
        if cap is not None and bound >= cap:
            return False
        return bound < self.outstanding_batches

    def wake_one_hungry(self) -> None:
        """Wake one stream waiting for tasks (one per queued batch is enough)."""
        if self.hungry:
            conn = next(iter(self.hungry))
            del self.hungry[conn]
            conn.wake.set()

    def wake_clients(self) -> None:
        for conn in self.clients:
            conn.wake.set()

    def notify_if_drained(self) -> None:
        if self.drained_waiters and self.drained:
            for fut in self.drained_waiters:
                if not fut.done():
                    fut.set_result(None)
            self.drained_waiters.clear()


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
    failure: BaseException | None = None  # ends its WorkerUpdate with this status (a fault)

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
    peer: str = ""  # the worker's connection (gRPC's peer address): its streams share it
    lost: bool = False  # ended by a broken call (cancelled, or its requests failed)

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


class SessionTable:
    """Open sessions by id, closing ones (closed without ``cleanup_on_client_exit``:
    their answers and dead letters are still read) and the ids of closed ones
    (with the tasks left unanswered), so CloseSession is idempotent and ``join``
    can tell "closed" from "unknown"."""

    def __init__(self) -> None:
        self.open: dict[str, SessionState] = {}
        self.closing: dict[str, SessionState] = {}
        self.closed: OrderedDict[str, int] = OrderedDict()

    def get(self, session_id: str) -> SessionState:
        """The open session, or ``Rejected`` (INVALID_ARGUMENT / NOT_FOUND)."""
        s = self.open.get(session_id)
        if s is not None:
            return s
        if not session_id:
            raise Rejected("INVALID_ARGUMENT", "no session id given")
        if session_id in self.closed or session_id in self.closing:
            raise Rejected("NOT_FOUND", f"session {session_id} was closed")
        raise Rejected("NOT_FOUND", f"session {session_id} not found")

    def forget(self, s: SessionState) -> None:
        """``s`` is gone for good: remember only its id and what it left unanswered."""
        self.open.pop(s.id, None)
        self.closing.pop(s.id, None)
        self.closed[s.id] = s.unanswered_tasks
        while len(self.closed) > _CLOSED_REMEMBERED:
            self.closed.popitem(last=False)
