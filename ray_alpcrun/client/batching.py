"""Cutting an iterable of payloads into batches, and the optional progress bar.

``batch_size`` is an upper bound. A batch is cut further where needed so that
it fits the message limit as protobuf encodes it (ids and framing counted), and
so that its answers fit one batch too, even when every task fails with an error
(at most ``answers.answer_bytes_bound`` per task): a worker answers a task batch
with one batch. A task that does not fit a batch even alone is not sent; the
caller fails it alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ray_alpcrun import progress
from ray_alpcrun.answers import answer_bytes_bound
from ray_alpcrun.types import Message
from ray_alpcrun.wire import message_bytes


def as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"task payloads must be bytes, got {type(payload).__name__}")


def checked(chunk: list[bytes]) -> list[bytes]:
    """``chunk`` with every payload as ``bytes`` (the caller's iterable may hold anything)."""
    for i, p in enumerate(chunk):
        if type(p) is not bytes:
            chunk[i] = as_bytes(p)
    return chunk


@dataclass(frozen=True, slots=True)
class Part:
    """A run of consecutive tasks: ``offset`` of the first in the packed list; a
    part that does not ``fit`` is one task too large to travel even alone."""

    offset: int
    messages: list[Message]
    fits: bool = True


def pack(messages: list[Message], header_bytes: int, max_batch_bytes: int) -> list[Part]:
    """Split ``messages`` (in order) into batches of at most ``max_batch_bytes``
    encoded bytes (``header_bytes`` for the batch's own fields), each with
    answers that fit as many bytes (see the module docstring)."""
    room = max_batch_bytes - header_bytes
    parts: list[Part] = []
    start = 0
    used = answers = 0
    for i, m in enumerate(messages):
        size = message_bytes(m)
        answer = answer_bytes_bound(m.id)
        if size > room or answer > room:
            if i > start:
                parts.append(Part(start, messages[start:i]))
            parts.append(Part(i, [m], fits=False))
            start, used, answers = i + 1, 0, 0
            continue
        if i > start and (used + size > room or answers + answer > room):
            parts.append(Part(start, messages[start:i]))
            start, used, answers = i, 0, 0
        used += size
        answers += answer
    if start < len(messages):
        parts.append(Part(start, messages[start:]))
    return parts


async def chunks(
    payloads: Iterable[bytes] | AsyncIterable[bytes], batch_size: int
) -> AsyncIterator[list[bytes]]:
    """Lists of at most ``batch_size`` payloads, checked to be bytes, lazily."""
    if isinstance(payloads, AsyncIterable):
        chunk: list[bytes] = []
        async for p in payloads:
            chunk.append(p)
            if len(chunk) >= batch_size:
                yield checked(chunk)
                chunk = []
        if chunk:
            yield checked(chunk)
        return
    it = iter(payloads)
    while True:
        chunk = list(islice(it, batch_size))
        if not chunk:
            return
        yield checked(chunk)


def progress_bar(payloads: object) -> Any:
    """A tqdm bar (notebook widget where available); total known for sized inputs."""
    total = len(payloads) if hasattr(payloads, "__len__") else None
    return progress.progress_bar(total, desc="tasks")
