"""Turning a task batch into its result batch (ALPCRUN_PROTOCOL.md 5.3 result rules).

Pure functions, no gRPC or Ray: same batch ``id`` and ``session_id``; each
result has ``id`` and ``related_id`` equal to the task's id; a failed task has
``error`` and no payload; a batch that could not run at all is ``dead``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray_alpcrun.runtime import Outcome
from ray_alpcrun.types import Batch, Message

# Per-message protobuf framing (tags, lengths, ids) is small; this bounds it
# generously so a result batch that passes the check also passes gRPC's limit.
_MESSAGE_OVERHEAD_BYTES = 64


def result_batch(task: Batch, outcomes: Sequence[Outcome], max_message_bytes: int) -> Batch:
    """The answer to ``task``; oversized results become per-task errors, never drops."""
    if len(outcomes) != len(task.messages):
        raise ValueError(f"{len(outcomes)} outcomes for {len(task.messages)} tasks")
    messages = [
        Message(m.id, b"", m.id, error)
        if error is not None
        else Message(m.id, payload or b"", m.id)
        for m, (payload, error) in zip(task.messages, outcomes, strict=True)
    ]
    _fit(messages, max_message_bytes)
    return Batch(id=task.id, session_id=task.session_id, messages=messages, dead=False)


def _size(messages: Sequence[Message]) -> int:
    return sum(
        len(m.payload) + len(m.id) * 2 + len(m.error or "") + _MESSAGE_OVERHEAD_BYTES
        for m in messages
    )


def _fit(messages: list[Message], limit: int) -> None:
    total = _size(messages)
    if total <= limit:
        return
    # Replace the largest payloads by an error until the batch fits.
    order = sorted(range(len(messages)), key=lambda i: len(messages[i].payload), reverse=True)
    for i in order:
        if total <= limit:
            break
        m = messages[i]
        size = len(m.payload)
        error = (
            f"result too large: {size} bytes do not fit in the result batch "
            f"(max message size {limit} bytes)"
        )
        messages[i] = Message(m.id, b"", m.id, error)
        total -= size
        total += len(error)
