"""Small, real handler functions: ``handle(payload, shared) -> bytes``.

Name them on command lines as ``ray_alpcrun.examples.workloads:noop``; they ship
inside the package, so they import from any directory.
"""

from __future__ import annotations

import numpy as np

CPU_MATRIX_N = 160  # with CPU_ROUNDS: about 5 ms per task on a 2-core dev box
CPU_ROUNDS = 20


def noop(payload: bytes, shared: bytes | None) -> bytes:
    """Echo the payload: measures the plumbing, not the work."""
    return payload


def cpu(payload: bytes, shared: bytes | None) -> bytes:
    """About 5 ms of deterministic NumPy work seeded by the payload; returns 8 bytes
    (a float64 checksum), identical for identical payloads on any worker."""
    seed = int.from_bytes(payload[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((CPU_MATRIX_N, CPU_MATRIX_N))
    # Scaled so entries stay of order one: the work and the checksum stay meaningful.
    b = rng.standard_normal((CPU_MATRIX_N, CPU_MATRIX_N)) * (2.0 / np.sqrt(CPU_MATRIX_N))
    for _ in range(CPU_ROUNDS):
        a = np.tanh(a @ b)
    return np.float64(a.sum()).tobytes()


def shared_sum(payload: bytes, shared: bytes | None) -> bytes:
    """Sum a slice of the shared data, read as little-endian int64.

    The payload is ``b"START:STOP"`` (indices into the int64 array); the result
    is the sum as ASCII digits. Fails when the batch carries no shared data.
    """
    if shared is None:
        raise ValueError("shared_sum needs shared data")
    start, _, stop = payload.partition(b":")
    values = np.frombuffer(shared, dtype="<i8")
    return str(int(values[int(start) : int(stop)].sum())).encode()


# Read the shared data as a zero-copy view of Ray's object store (no per-actor copy).
shared_sum.zero_copy_shared = True  # type: ignore[attr-defined]


def fail_on(payload: bytes, shared: bytes | None) -> bytes:
    """Echo, but raise for payloads starting with ``b"fail"`` (per-task errors)."""
    if payload.startswith(b"fail"):
        raise RuntimeError(f"asked to fail: {payload.decode(errors='replace')}")
    return payload
