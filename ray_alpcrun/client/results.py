"""What a client submission hands back, and the bookkeeping of one submission.

No gRPC here: :class:`Submission` is fed by the session's result stream
(:mod:`ray_alpcrun.client.stream`) and drained by ``submit``/``run``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ray_alpcrun.errors import TaskFailed

DEAD_LETTER_ERROR = "dead letter: the queue manager gave up on this task"


@dataclass(frozen=True, slots=True)
class TaskResult:
    """The one answer a task gets.

    ``index`` is the task's position in the submitted iterable; ``task_id`` the
    id it travelled under. A successful task has ``payload`` (bytes, possibly
    empty) and ``error is None``; a failed task has ``error`` and no payload;
    ``dead`` is true when the answer came from the session's dead-letter queue.

    Example::

        for r in session.submit(payloads):
            print(r.index, r.value() if r.ok else r.error)
    """

    task_id: str
    index: int
    payload: bytes | None
    error: str | None
    dead: bool
    batch_id: str

    @property
    def ok(self) -> bool:
        """True when the handler produced a result."""
        return self.error is None and not self.dead

    def value(self) -> bytes:
        """The result payload; raises :class:`~ray_alpcrun.errors.TaskFailed` otherwise."""
        if self.error is not None or self.dead:
            raise TaskFailed(self.task_id, self.error or DEAD_LETTER_ERROR)
        return self.payload if self.payload is not None else b""


# A queue item: a chunk of answers, an error ending the submission, or a wake-up
# (None) telling the consumer to re-check whether everything was answered.
Item = list[TaskResult] | BaseException | None


class Submission:
    """Counters and the answer queue of one ``submit`` call.

    ``sent`` counts tasks written to the stream, ``answered`` those routed back
    (results or dead letters), ``handed_out`` those the consumer took. Sending
    pauses while ``held`` (sent and not yet taken by the consumer: unanswered,
    or answered and waiting in ``items``) reaches ``max_pending_tasks``, so
    neither a huge lazy iterable nor a slow consumer grows the client's memory
    or floods the queue manager.
    """

    __slots__ = (
        "_space",
        "all_sent",
        "answered",
        "handed_out",
        "items",
        "max_pending_tasks",
        "sent",
    )

    def __init__(self, max_pending_tasks: int) -> None:
        if max_pending_tasks < 1:
            raise ValueError("max_pending_tasks must be at least 1")
        self.max_pending_tasks = max_pending_tasks
        self.sent = 0
        self.answered = 0
        self.handed_out = 0  # answers the consumer took from ``items``
        self.all_sent = False
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self._space = asyncio.Event()
        self._space.set()

    @property
    def outstanding(self) -> int:
        return self.sent - self.answered

    @property
    def held(self) -> int:
        """Tasks this submission holds memory for: sent and not yet taken."""
        return self.sent - self.handed_out

    @property
    def finished(self) -> bool:
        """Everything sent, and every answer taken by the consumer (answers still
        queued in ``items`` do not count: the consumer must not stop before them)."""
        return self.all_sent and self.handed_out == self.sent

    def deliver(self, chunk: list[TaskResult]) -> None:
        self.answered += len(chunk)
        self.items.put_nowait(chunk)

    def took(self, count: int) -> None:
        """The consumer took ``count`` answers: their memory is free again."""
        self.handed_out += count
        if self.held < self.max_pending_tasks:
            self._space.set()

    def fail(self, exc: BaseException) -> None:
        self.items.put_nowait(exc)
        self._space.set()  # let a waiting sender run into the failure

    def mark_all_sent(self) -> None:
        self.all_sent = True
        self.items.put_nowait(None)

    async def wait_for_space(self) -> None:
        while self.held >= self.max_pending_tasks:
            self._space.clear()
            await self._space.wait()
