"""What a stalled or growing bridge is doing, without a debugger: its asyncio
tasks and where they wait, and where its Python memory grew (``Bridge.debug_tasks``
and ``Bridge.debug_memory``; the chaos run prints both, see docs/performance.md)."""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from typing import Any


def describe_tasks(frames: int = 6) -> list[str]:
    """One line per pending asyncio task of the running loop: its name and the
    innermost ``frames`` frames of its await chain (``file:line function``)."""
    out = []
    for task in asyncio.all_tasks():
        chain = []
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                name = os.path.basename(frame.f_code.co_filename)
                chain.append(f"{name}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        out.append(f"{task.get_name()}: {' > '.join(chain[-frames:]) or 'not started'}")
    return sorted(out)


class MemoryTrace:
    """Snapshots of ``tracemalloc`` (on only under ``PYTHONTRACEMALLOC``)."""

    def __init__(self) -> None:
        self._base: tracemalloc.Snapshot | None = None

    def growth(self, top: int = 15) -> list[str]:
        """Where memory grew since the previous call (nothing on the first)."""
        if not tracemalloc.is_tracing():
            return []
        snapshot = tracemalloc.take_snapshot()
        base, self._base = self._base, snapshot
        if base is None:
            return []
        lines = [f"objects tracked by gc: {len(gc.get_objects())}"]
        for stat in snapshot.compare_to(base, "traceback")[:top]:
            where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stat.traceback)
            kib = stat.size_diff / 1024
            lines.append(f"{kib:+.1f} KiB in {stat.count_diff:+d} blocks: {where}")
        return lines
