"""Handlers for the multi-node scenarios (imported by the pool actors)."""

from __future__ import annotations

import os
import time

import ray


def slow(payload: bytes, shared: bytes | None) -> bytes:
    """Sleeps ``payload``'s milliseconds (default 20); answers with where it ran."""
    text = payload.decode()
    ms = int(text.split(":", 1)[1]) if ":" in text else 20
    time.sleep(ms / 1000)  # ok: the handler's work is to take this long
    node = ray.get_runtime_context().get_node_id()
    return f"{text}|{node}|{os.getpid()}".encode()


def shared_size(payload: bytes, shared: bytes | None) -> bytes:
    return str(len(shared) if shared is not None else -1).encode()
