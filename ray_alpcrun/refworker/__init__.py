"""The plain single-process ALPCRUN.CH worker (no Ray): the protocol check from
the worker side and the performance baseline.

Example::

    from ray_alpcrun.config import ServiceConfig
    from ray_alpcrun.refworker import ReferenceWorkerConfig, start_in_thread

    config = ReferenceWorkerConfig(ServiceConfig(queue_address="127.0.0.1:1337",
                                                 cache_address="127.0.0.1:3337"))
    handle = start_in_thread(config, "ray_alpcrun.examples.workloads:noop")
    ...
    handle.stop()
"""

from __future__ import annotations

from ray_alpcrun.refworker.thread import WorkerThread, start_in_thread
from ray_alpcrun.refworker.worker import ReferenceWorker, ReferenceWorkerConfig, WorkerStats

__all__ = [
    "ReferenceWorker",
    "ReferenceWorkerConfig",
    "WorkerStats",
    "WorkerThread",
    "start_in_thread",
]
