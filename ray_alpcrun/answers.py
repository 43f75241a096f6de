"""Answer batches (ALPCRUN_PROTOCOL.md 5.3 result rules), built in one place and
always within the message limit.

The bridge, the reference worker and the devserver build their result batches,
dead batches and dead letters here. The rules: same batch ``id`` and
``session_id`` as the task batch; each answer has ``id`` and ``related_id``
equal to the task's id; a failed task has an ``error`` and no payload; a batch
that could not run at all is ``dead`` with an ``error`` on every message.

What gets encoded is measured (``wire.batch_bytes``), and a batch over
``max_message_bytes`` is made to fit, changing only what does not fit:

1. the longest errors are trimmed to their first ``REASON_KEEP_CHARS``
   characters (plus a note of the length they had), longest first, until the
   batch fits;
2. then the largest result payloads are replaced by a ``result too large``
   error, largest first;
3. then the batch is split into several batches with the same id.

A worker's answer goes through all three: the queue manager matches one answer
per task batch, so splitting is the last resort (the devserver re-delivers the
tasks a first part left unanswered, and the next delivery's answer is smaller).
A dead letter keeps its payloads (the client may resubmit them), so it is split
first; only a message that does not fit even alone loses its payload. The
project's client cuts its batches so that their answers fit even when every task
fails (:func:`answer_bytes_bound`), which keeps step 3 for other clients' batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ray_alpcrun.types import Batch, Message
from ray_alpcrun.wire import batch_header_bytes, message_bytes, text_bytes, varint_bytes

if TYPE_CHECKING:
    from ray_alpcrun.runtime import Outcome

REASON_KEEP_CHARS = 200


def _trim_note(length: int) -> str:
    return f"… [{length} characters, trimmed to fit max_message_bytes]"


# The most bytes a trimmed error takes: every kept character may need 4 in UTF-8.
TRIMMED_ERROR_MAX_BYTES = 4 * REASON_KEEP_CHARS + text_bytes(_trim_note(10**15))


def trimmed(error: str) -> str:
    """``error`` cut to its first ``REASON_KEEP_CHARS`` characters and a note of its length."""
    if len(error) <= REASON_KEEP_CHARS:
        return error
    return error[:REASON_KEEP_CHARS] + _trim_note(len(error))


def answer_bytes_bound(task_id: str) -> int:
    """The most bytes the answer to task ``task_id`` takes in a batch once fitted:
    no payload, ``id`` and ``related_id``, and an error of at most
    ``TRIMMED_ERROR_MAX_BYTES``. Batches of at most ``room // bound`` tasks can
    always be answered in one batch of ``room`` bytes (plus its header)."""
    id_field = 1 + varint_bytes(text_bytes(task_id)) + text_bytes(task_id)
    error_field = 1 + varint_bytes(TRIMMED_ERROR_MAX_BYTES) + TRIMMED_ERROR_MAX_BYTES
    inner = 2 * id_field + error_field
    return 1 + varint_bytes(inner) + inner


def result_batches(
    task: Batch,
    outcomes: Sequence[Outcome],
    max_message_bytes: int,
    *,
    session_id: str | None = None,
) -> list[Batch]:
    """The answer to ``task`` (usually one batch): a result or an error per task;
    what does not fit becomes smaller per-task errors, never drops."""
    if len(outcomes) != len(task.messages):
        raise ValueError(f"{len(outcomes)} outcomes for {len(task.messages)} tasks")
    messages = [
        Message(m.id, b"", m.id, error)
        if error is not None
        else Message(m.id, payload or b"", m.id)
        for m, (payload, error) in zip(task.messages, outcomes, strict=True)
    ]
    head = Batch(id=task.id, session_id=_session(task, session_id), dead=False)
    return fit(head, messages, max_message_bytes)


def dead_batches(
    task: Batch, reason: str, max_message_bytes: int, *, session_id: str | None = None
) -> list[Batch]:
    """``task`` answered dead by a worker (usually one batch): every message with
    ``related_id`` = its id and ``reason`` as its error, no payloads."""
    messages = [Message(m.id, b"", m.id, reason) for m in task.messages]
    head = Batch(id=task.id, session_id=_session(task, session_id), dead=True)
    return fit(head, messages, max_message_bytes)


def dead_letters(
    task: Batch,
    reason: str,
    max_message_bytes: int,
    errors: Mapping[str, str] | None = None,
    *,
    batch_id: str | None = None,
) -> list[Batch]:
    """The dead-letter form of ``task``, as a queue manager hands it to its client:
    the batch's options and payloads kept (so it can be resubmitted), ``dead=True``
    and an error on every message (``errors[id]`` where given, else ``reason``),
    under ``batch_id`` (default: the task batch's id); split to fit."""
    errs = errors or {}
    messages = [Message(m.id, m.payload, m.id, errs.get(m.id) or reason) for m in task.messages]
    head = Batch(
        id=task.id if batch_id is None else batch_id,
        session_id=task.session_id,
        priority=task.priority,
        use_shared_data=task.use_shared_data,
        required_shared_data_update_level=task.required_shared_data_update_level,
        dead=True,
    )
    return fit(head, messages, max_message_bytes, keep_payloads=True)


def fit(
    head: Batch, messages: list[Message], max_message_bytes: int, *, keep_payloads: bool = False
) -> list[Batch]:
    """``head`` carrying ``messages``, made to fit ``max_message_bytes`` (the steps in
    the module docstring; ``keep_payloads`` splits before it trims). ``messages``
    may be changed in place."""
    sizes = [message_bytes(m) for m in messages]
    head_bytes = batch_header_bytes(head)
    total = head_bytes + sum(sizes)
    if total <= max_message_bytes:
        return [replace(head, messages=messages)]
    if not keep_payloads:
        total = _shrink(messages, sizes, total, max_message_bytes, _error_length, _trim)
        total = _shrink(
            messages,
            sizes,
            total,
            max_message_bytes,
            _payload_length,
            _payload_dropper(max_message_bytes),
        )
        if total <= max_message_bytes:
            return [replace(head, messages=messages)]
    room = max_message_bytes - head_bytes
    drop = _payload_dropper(max_message_bytes)
    for i, size in enumerate(sizes):
        if size > room:  # not even alone: trim, then leave the payload out
            m = _trim(messages[i])
            if message_bytes(m) > room:
                m = drop(m)
            messages[i] = m
            sizes[i] = message_bytes(m)
    return _split(head, messages, sizes, room)


def _session(task: Batch, session_id: str | None) -> str:
    return task.session_id if session_id is None else session_id


def _error_length(m: Message) -> int:
    return len(m.error) if m.error is not None and len(m.error) > REASON_KEEP_CHARS else 0


def _payload_length(m: Message) -> int:
    return len(m.payload)


def _trim(m: Message) -> Message:
    if m.error is None or len(m.error) <= REASON_KEEP_CHARS:
        return m
    return replace(m, error=trimmed(m.error))


def _payload_dropper(limit: int) -> Callable[[Message], Message]:
    def drop(m: Message) -> Message:
        size = len(m.payload)
        if m.error is None:
            error = (
                f"result too large: {size} bytes do not fit in the result batch "
                f"(max message size {limit} bytes)"
            )
        else:
            error = (
                f"{trimmed(m.error)} (its payload of {size} bytes is left out: "
                f"it does not fit in max message size {limit} bytes)"
            )
        return replace(m, payload=b"", error=error)

    return drop


def _shrink(
    messages: list[Message],
    sizes: list[int],
    total: int,
    limit: int,
    key: Callable[[Message], int],
    change: Callable[[Message], Message],
) -> int:
    """Apply ``change`` to the messages with the largest positive ``key`` first,
    until ``total`` fits ``limit``; returns the new total."""
    if total <= limit:
        return total
    candidates = [i for i, m in enumerate(messages) if key(m) > 0]
    candidates.sort(key=lambda i: key(messages[i]), reverse=True)
    for i in candidates:
        if total <= limit:
            break
        m = change(messages[i])
        size = message_bytes(m)
        total += size - sizes[i]
        messages[i], sizes[i] = m, size
    return total


def _split(head: Batch, messages: list[Message], sizes: list[int], room: int) -> list[Batch]:
    parts: list[Batch] = []
    part: list[Message] = []
    used = 0
    for m, size in zip(messages, sizes, strict=True):
        if part and used + size > room:
            parts.append(replace(head, messages=part))
            part, used = [], 0
        part.append(m)
        used += size
    if part or not parts:
        parts.append(replace(head, messages=part))
    return parts
