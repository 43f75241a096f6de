"""The machine side of a chaos run (``tests/support/chaos_cluster.py``): the Ray
cluster of raylets on this machine, the run's processes (each carries ``MARK``
in its environment), their nodes and memory, and the main thread's errands."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import socket
import threading
from pathlib import Path
from typing import Any

MARK = "ALPCRUN_CHAOS_RUN"  # every process of the run carries it in its environment
WORKER_NODES, NODE_CPUS = 3, 2


# -- processes of this run ------------------------------------------------------


def marked(run_id: str) -> dict[int, str]:
    """pid -> command line (a Ray worker's is its title, ``ray::NodeBridge...``)."""
    needle = f"{MARK}={run_id}".encode()
    me = os.getpid()
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = cmd.strip()
    return out


def node_of(pid: int) -> str:
    """The node a Ray worker process runs on: its raylet's ``METALCORE_WORKER_NODE``."""
    try:
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"METALCORE_WORKER_NODE="):
                return item.partition(b"=")[2].decode()
    except OSError:
        pass
    return "?"


# -- the cluster ------------------------------------------------------------------


class MainThread:
    """Runs what must run on the main thread (Ray's ``Cluster.add_node`` sets a
    signal handler) while the run's event loop turns in another thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Any, tuple[Any, ...], concurrent.futures.Future[Any]]]
        self._jobs = queue.Queue()

    async def call(self, fn: Any, *args: Any) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, args, fut))
        return await asyncio.wrap_future(fut)

    def serve_until(self, done: threading.Event) -> None:
        while not done.is_set():
            try:
                fn, args, fut = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Nodes:
    """The Ray cluster: a 0-CPU head and worker nodes named ``chaos-node-K``."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.dashboard_port = free_port()  # the state API's address (list_actors)
        # CHAOS_TRACEMALLOC=N: the head's processes (the coordinator) trace N frames,
        # and the run prints where the coordinator's memory grew after warm-up.
        trace = os.environ.get("CHAOS_TRACEMALLOC")
        if trace:
            os.environ["PYTHONTRACEMALLOC"] = trace
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                # Another cluster on this machine may hold the default port (8265).
                "include_dashboard": True,
                "dashboard_port": self.dashboard_port,
                "object_store_memory": 100 << 20,
                # A removed node is declared dead in seconds, not Ray's default ~30 s.
                "_system_config": {
                    "health_check_period_ms": 500,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        os.environ.pop("PYTHONTRACEMALLOC", None)
        self.workers: list[tuple[str, Any]] = []
        self._next = 0
        self.lock = asyncio.Lock()

    def add(self) -> str:
        name = f"chaos-node-{self._next}"
        self._next += 1
        # Raylets inherit os.environ at add_node: each names its node bridge so.
        os.environ["METALCORE_WORKER_NODE"] = name
        try:
            node = self.cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=80 << 20)
        finally:
            del os.environ["METALCORE_WORKER_NODE"]
        self.workers.append((name, node))
        return name

    def remove(self, index: int) -> str:
        name, node = self.workers.pop(index)
        self.cluster.remove_node(node, allow_graceful=False)
        return name

    def shutdown(self) -> None:
        self.cluster.shutdown()
