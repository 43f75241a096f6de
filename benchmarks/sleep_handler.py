"""The scale-out benchmark's task: 2 ms of sleep, nothing in, nothing out; and the
chaos run's (``benchmarks/chaos_cluster.py``): sleep as long as the payload says,
answer the payload.

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


def echo_sleep(payload: bytes, shared: bytes | None) -> bytes:
    """``b"<anything>:<ms>"``: sleeps ``ms`` milliseconds, answers the payload itself
    (so that an answer carrying another task's payload is seen)."""
    time.sleep(int(payload.rpartition(b":")[2] or 0) / 1000.0)
    return payload
