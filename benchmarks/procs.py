"""CPU time and command line of running processes and their threads, from ``/proc``.

Linux only; elsewhere (or once a process is gone) the readers give 0 s, nothing
or ``"?"``, so a measurement shows a gap rather than failing.
"""

from __future__ import annotations

import os


def _stat_cpu(path: str) -> tuple[str, float] | None:
    """(name, CPU seconds user + system) from a ``/proc/.../stat`` file; None if unreadable."""
    try:
        with open(path) as f:
            head, _, rest = f.read().rpartition(")")  # the name may hold ")" itself
    except OSError:
        return None
    fields = rest.split()  # fields[11], fields[12]: utime, stime (fields 14, 15 of stat(5))
    return head.partition("(")[2], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process so far; 0 when it cannot be read."""
    got = _stat_cpu(f"/proc/{pid}/stat")
    return got[1] if got is not None else 0.0


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of a process: {tid: (name, seconds)}."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        got = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        if got is not None:
            out[int(tid)] = got
    return out


def name(pid: int) -> str:
    """The process's command line (its first 90 characters), or ``"?"``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:90]
    except OSError:
        return "?"
