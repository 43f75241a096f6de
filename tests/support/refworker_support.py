"""Helpers shared by the client and reference-worker tests."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from ray_alpcrun.client import Client, TaskResult
from ray_alpcrun.config import ServiceConfig
from ray_alpcrun.devserver import LocalServices
from ray_alpcrun.refworker import ReferenceWorkerConfig, WorkerThread, start_in_thread


def mixed(payload: bytes, shared: bytes | None) -> bytes:
    """``sum:A:B`` sums int64 shared data [A:B); ``fail...`` raises; else echo."""
    if payload.startswith(b"fail"):
        raise ValueError(f"asked to fail: {payload.decode()}")
    if payload.startswith(b"sum:"):
        if shared is None:
            raise ValueError("no shared data")
        start, stop = (int(x) for x in payload[4:].split(b":"))
        return str(int(np.frombuffer(shared, dtype="<i8")[start:stop].sum())).encode()
    return payload


class Gate:
    """A handler that answers its first ``free`` tasks, then blocks until opened:
    the worker holding it can be killed with batches in flight."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.seen = 0
        self.blocked = threading.Event()
        self.opened = threading.Event()

    def __call__(self, payload: bytes, shared: bytes | None) -> bytes:
        self.seen += 1
        if self.seen > self.free:
            self.blocked.set()
            self.opened.wait(30)
        return payload


def start_worker(service: ServiceConfig, handler: object, pod: str = "") -> WorkerThread:
    from ray_alpcrun.config import WorkerIdentity

    identity = WorkerIdentity(pod=pod) if pod else WorkerIdentity()
    config = ReferenceWorkerConfig(service=service, identity=identity, drain_timeout_s=5.0)
    handle = start_in_thread(config, handler)  # type: ignore[arg-type]
    handle.wait_registered()
    return handle


def connect(services: LocalServices, **kwargs: Any) -> Client:
    """A client of ``services``, with their API key unless ``api_key`` is given."""
    kwargs.setdefault("api_key", services.api_key)
    return Client(
        queue=services.queue_address,
        central_cache=services.central_cache_address,
        proto_package=services.proto_package,
        **kwargs,
    )


def assert_exactly_once(results: Iterable[TaskResult], n: int) -> list[TaskResult]:
    """Every index 0..n-1 answered exactly once, under distinct task ids."""
    results = list(results)
    counts = Counter(r.index for r in results)
    assert sorted(counts) == list(range(n)), "missing or foreign answers"
    assert max(counts.values()) == 1, "a task was answered twice"
    assert len({r.task_id for r in results}) == n
    return sorted(results, key=lambda r: r.index)
