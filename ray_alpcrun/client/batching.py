"""Cutting an iterable of payloads into batches, and the optional progress bar."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from itertools import islice
from typing import Any

from ray_alpcrun import progress


def as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"task payloads must be bytes, got {type(payload).__name__}")


def split_by_size(chunk: list[bytes], max_batch_bytes: int) -> list[list[bytes]]:
    """Check payload types and split ``chunk`` so no part exceeds ``max_batch_bytes``
    (a single payload larger than that travels alone)."""
    size = 0
    for i, p in enumerate(chunk):
        if type(p) is not bytes:  # the caller's iterable may hold anything at run time
            chunk[i] = p = as_bytes(p)
        size += len(p)
    if size <= max_batch_bytes:
        return [chunk]
    parts: list[list[bytes]] = []
    part: list[bytes] = []
    size = 0
    for p in chunk:
        if part and size + len(p) > max_batch_bytes:
            parts.append(part)
            part, size = [], 0
        part.append(p)
        size += len(p)
    if part:
        parts.append(part)
    return parts


async def chunks(
    payloads: Iterable[bytes] | AsyncIterable[bytes], batch_size: int, max_batch_bytes: int
) -> AsyncIterator[list[bytes]]:
    """Batches of at most ``batch_size`` payloads and ``max_batch_bytes`` bytes, lazily."""
    if isinstance(payloads, AsyncIterable):
        chunk: list[bytes] = []
        async for p in payloads:
            chunk.append(p)
            if len(chunk) >= batch_size:
                for part in split_by_size(chunk, max_batch_bytes):
                    yield part
                chunk = []
        if chunk:
            for part in split_by_size(chunk, max_batch_bytes):
                yield part
        return
    it = iter(payloads)
    while True:
        chunk = list(islice(it, batch_size))
        if not chunk:
            return
        for part in split_by_size(chunk, max_batch_bytes):
            yield part


def progress_bar(payloads: object) -> Any:
    """A tqdm bar (notebook widget where available); total known for sized inputs."""
    total = len(payloads) if hasattr(payloads, "__len__") else None
    return progress.progress_bar(total, desc="tasks")
