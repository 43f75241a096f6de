"""What a stalled or growing bridge is doing, without a debugger: its asyncio
tasks and where they wait, and where its Python memory grew (``Bridge.debug_tasks``
and ``Bridge.debug_memory``; the chaos run prints both, see docs/performance.md)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost",
    )]  # fmt: skip


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):  # not glibc (2.33+): no heap figures
        return None


def heap_bytes() -> tuple[int, int] | None:
    """This process's C heap (every arena of glibc's malloc): bytes in use and
    bytes freed but held. None where the libc is not glibc."""
    libc = _libc()
    if libc is None:
        return None
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


def heap_line(trim: bool = False) -> str | None:
    """:func:`heap_bytes` and the process's VmRSS as a line; with ``trim``, after
    ``malloc_trim(0)`` too. Tells a leak (in use grows) from memory freed and
    not given back (held grows). None where the libc is not glibc."""
    figures = heap_bytes()
    if figures is None:
        return None

    def one(in_use: int, held: int) -> str:
        rss = (rss_kb(os.getpid()) or 0) / 1024
        return f"in use {in_use / 2**20:.1f} MB, held free {held / 2**20:.1f} MB, rss {rss:.1f} MB"

    line = f"heap: {one(*figures)}"
    if trim:
        trim_heap()
        line += f"; after malloc_trim: {one(*(heap_bytes() or figures))}"
    return line


def trim_heap() -> None:
    """Give the memory malloc holds free back to the system (``malloc_trim(0)``,
    glibc; elsewhere nothing). A bridge's Ray and gRPC threads allocate in
    arenas of their own, and what they free stays held there: in a 46-minute
    chaos run (1,251 actors replaced) the coordinator's held-free memory grew
    from 12 to 24 MB, and one trim at the end took its VmRSS from 151 to 141 MB."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_kb(pid: int) -> int | None:
    """VmRSS of process ``pid`` in KiB (Linux), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryTrace:
    """Snapshots of ``tracemalloc`` (on only under ``PYTHONTRACEMALLOC``)."""

    def __init__(self) -> None:
        self._base: tracemalloc.Snapshot | None = None

    def growth(self, top: int = 15, trim: bool = False) -> list[str]:
        """The C heap's figures (:func:`heap_line`), then, under tracemalloc,
        where Python memory grew since the previous call (nothing on the first)."""
        heap = heap_line(trim)
        lines = [heap] if heap else []
        if not tracemalloc.is_tracing():
            return lines
        snapshot = tracemalloc.take_snapshot()
        base, self._base = self._base, snapshot
        if base is None:
            return lines
        lines.append(f"objects tracked by gc: {len(gc.get_objects())}")
        for stat in snapshot.compare_to(base, "traceback")[:top]:
            where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in stat.traceback)
            kib = stat.size_diff / 1024
            lines.append(f"{kib:+.1f} KiB in {stat.count_diff:+d} blocks: {where}")
        return lines
