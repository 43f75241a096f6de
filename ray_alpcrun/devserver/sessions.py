"""One session's queues and bookkeeping: tasks waiting (by batch priority),
batches in flight, results waiting for a client, dead letters, and the counts
that say whether every submitted task has been answered.

Pure data structures: no gRPC, no scheduling; ``core`` drives them.

Decisions (the docs are silent):

* Task batches are served highest ``Batch.priority`` first, FIFO within a
  priority. A batch taken back from a worker goes to the *front* of its
  priority, so it is the next one served.
* A result batch answers the tasks whose id (``related_id``, else ``id``)
  matches a task of the batch in flight; unknown or repeated answers are
  dropped. ``related_id`` (and an empty ``id``) is filled in with the task id
  when the worker left it out; an answer with neither ``id`` nor
  ``related_id`` answers the task at the same position in the batch.
  Tasks a result batch does not answer go back to the queue as a batch
  with the same id (the client may therefore see one batch id in several
  result batches); their delivery count carries over.
* A client may reuse a batch id (e.g. resubmitting after a reconnect): the copy
  gets an internal id towards workers, and both are answered under the
  client's id.
* A dead-lettered batch holds the original task payloads (so it can be
  resubmitted), ``dead=True`` and an ``error`` on every message: the worker's
  error for that task when it gave one, else the reason.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ray_alpcrun.types import Batch, Message, SessionAttributes

if TYPE_CHECKING:
    from ray_alpcrun.devserver.workers import ClientConn, StreamConn, Worker


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


def split_answers(pending: Pending, result: Batch) -> tuple[list[Message], list[Message]]:
    """(answers, unanswered tasks) of ``pending`` given the worker's ``result``."""
    tasks = pending.batch.messages
    if len(tasks) == 1 and len(result.messages) == 1:
        # Fast path: the common one-task batch needs no index.
        answer = result.messages[0]
        key = answer.related_id or answer.id or tasks[0].id
        if key == tasks[0].id:
            _label(answer, key)
            return [answer], []
        return [], tasks
    by_id = {t.id: t for t in tasks}
    answers: list[Message] = []
    for position, answer in enumerate(result.messages):
        key = answer.related_id or answer.id
        if not key and position < len(tasks):
            key = tasks[position].id  # an answer without ids answers the task at its place
        if by_id.pop(key, None) is None:
            continue
        _label(answer, key)
        answers.append(answer)
    return answers, list(by_id.values())


def _label(answer: Message, task_id: str) -> None:
    if answer.related_id is None:
        answer.related_id = task_id
    if not answer.id:
        answer.id = task_id


def dead_batch(pending: Pending, reason: str, worker_errors: dict[str, str] | None = None) -> Batch:
    """The dead-letter form of a task batch: payloads kept, every message has an error."""
    b = pending.batch
    errors = worker_errors or {}
    return Batch(
        id=pending.reply_id,
        session_id=b.session_id,
        priority=b.priority,
        messages=[
            Message(id=t.id, payload=t.payload, related_id=t.id, error=errors.get(t.id) or reason)
            for t in b.messages
        ],
        use_shared_data=b.use_shared_data,
        required_shared_data_update_level=b.required_shared_data_update_level,
        dead=True,
    )


def remainder(pending: Pending, tasks: list[Message]) -> Pending:
    """The unanswered part of a batch, same id and options, same delivery count."""
    b = pending.batch
    return Pending(
        Batch(
            id=b.id,
            session_id=b.session_id,
            priority=b.priority,
            messages=tasks,
            use_shared_data=b.use_shared_data,
            required_shared_data_update_level=b.required_shared_data_update_level,
        ),
        pending.deliveries,
        pending.client_batch_id,
    )
