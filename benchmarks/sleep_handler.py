"""The scale-out benchmark's task: 2 ms of sleep, nothing in, nothing out.

Named on the bridge's command line as ``benchmarks.sleep_handler:sleep_2ms`` (with
the repository root on ``PYTHONPATH``, as ``benchmarks/systems.py`` sets it). A
sleeping task holds its actor and no core, so that 16 actors on a 2-core machine
measure how fast the bridge keeps them busy, not the machine's cores.
"""

from __future__ import annotations

import time

TASK_S = 0.002


def sleep_2ms(payload: bytes, shared: bytes | None) -> bytes:
    time.sleep(TASK_S)  # the task's work is to take this long
    return b""
