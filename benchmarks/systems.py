"""The systems the benchmark compares, started as separate processes, and their memory.

* :class:`DevServer` — ``benchmarks/devserver_stats.py`` (local services + counters);
* :func:`reference_workers` — ``n`` plain workers (``python -m ray_alpcrun.refworker``):
  ``n = 1`` is the ``reference`` system, ``n = K`` the ``replicas`` system;
* :func:`bridge` — ``python -m ray_alpcrun.bridge --actors K``, which starts its own
  Ray: every process of that system (the CLI driver, GCS, raylet, dashboard and
  agents, the bridge actor, the pool actors, idle workers) descends from it;
* :func:`bridge_cluster` — the same CLI with ``--ray-address`` on a Ray cluster of
  raylets on this machine (:class:`ClusterHost`, ``benchmarks/cluster_host.py``):
  the CLI runs on the head (0 CPUs), the actors on the worker node(s);
* :class:`PssSampler` — peak total PSS of a set of process trees, from
  ``/proc/<pid>/smaps_rollup`` (PSS divides shared pages among the processes mapping
  them, so the sum counts each shared page once).

Every worker process gets the same environment, with NumPy/BLAS pinned to one
thread (:data:`WORKER_ENV`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ray_alpcrun.config import default_node

ROOT = Path(__file__).resolve().parents[1]
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def worker_env(api_key: str) -> dict[str, str]:
    """The environment of every worker-side process (all systems alike)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), METALCORE_API_KEY=api_key, **WORKER_ENV)


class DevServer:
    """One local devserver process; :meth:`stats` asks it for ``LocalServices.stats()``."""

    def __init__(self, api_key: str, max_message_bytes: int, log: IO[str]) -> None:
        command = [sys.executable, str(ROOT / "benchmarks" / "devserver_stats.py")]
        command += ["--api-key", api_key, "--max-message-bytes", str(max_message_bytes)]
        level = os.environ.get("BENCH_DEVSERVER_LOG_LEVEL", "warning")  # info: every re-delivery
        env = dict(os.environ, PYTHONPATH=str(ROOT), METALCORE_LOG_LEVEL=level)
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        self._lock = threading.Lock()
        line = self._readline()
        if not line:
            raise RuntimeError(f"devserver did not start (exit code {self.proc.wait()})")
        addresses = json.loads(line)
        self.queue: str = addresses["queue"]
        self.central_cache: str = addresses["central_cache"]
        self.node_cache: str = addresses["node_cache"]

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.ask("")
        return stats

    def ask(self, line: str) -> Any:
        """One request line to ``devserver_stats.py`` (see its docstring), its JSON answer."""
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return json.loads(self._readline())

    def wait_workers(
        self,
        n: int,
        check: Callable[[], None],
        timeout_s: float = READY_TIMEOUT_S,
        off_node: str | None = None,
    ) -> None:
        """Block until ``n`` workers are registered (not counting those registered
        from node ``off_node``); ``check()`` raises if they died."""
        deadline = time.monotonic() + timeout_s
        while self._registered(off_node) < n:
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} workers did not register within {timeout_s:g} s")
            time.sleep(0.1)  # ok: polling another process's counter

    def _registered(self, off_node: str | None) -> int:
        stats = self.stats()
        if off_node is None:
            return int(stats["workers"])
        return sum(k for node, k in stats["worker_nodes"].items() if node != off_node)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def devserver(api_key: str, max_message_bytes: int, log: IO[str]) -> Iterator[DevServer]:
    server = DevServer(api_key, max_message_bytes, log)
    try:
        yield server
    finally:
        server.close()


@dataclass
class Deployment:
    """A running system: the root processes whose trees make it up."""

    name: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def root_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{self.name}: process {p.pid} exited with {p.returncode}")


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM (graceful), then SIGKILL for each process group we started."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for p in procs:
        # Our own session: whatever the system left behind in it goes too.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


@contextmanager
def reference_workers(
    n: int, handler: str, dev: DevServer, api_key: str, max_message_bytes: int, log: IO[str]
) -> Iterator[Deployment]:
    """``n`` plain reference worker processes, registered when this yields."""
    command = [sys.executable, "-m", "ray_alpcrun.refworker", "--handler", handler]
    command += ["--queue", dev.queue, "--cache", dev.node_cache, "--log-level", "warning"]
    command += ["--max-message-bytes", str(max_message_bytes)]
    env = worker_env(api_key)
    dep = Deployment("reference" if n == 1 else f"replicas-{n}")
    try:
        for i in range(n):
            dep.procs.append(
                subprocess.Popen(
                    [*command, "--pod", f"bench-{i}"],
                    env=env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            )
        dev.wait_workers(n, dep.check_alive)
        yield dep
    finally:
        _stop(dep.procs)


def bridge_command(
    k: int,
    handler: str,
    dev: DevServer,
    max_message_bytes: int,
    data_path: str,
    cpus: float,
) -> list[str]:
    """The bridge CLI with ``k`` actors reserving ``min(1, cpus / k)`` CPUs each."""
    command = [sys.executable, "-m", "ray_alpcrun.bridge", "--handler", handler]
    command += ["--queue", dev.queue, "--cache", dev.node_cache, "--log-level", "warning"]
    command += ["--actors", str(k), "--cpus-per-actor", f"{min(1.0, cpus / k):g}"]
    command += ["--max-message-bytes", str(max_message_bytes), "--data-path", data_path]
    return command


@contextmanager
def bridge(
    k: int,
    handler: str,
    dev: DevServer,
    api_key: str,
    max_message_bytes: int,
    log: IO[str],
    data_path: str = "calls",
) -> Iterator[Deployment]:
    """The bridge CLI with ``k`` actors (and ``k`` slots), its own Ray; registered when
    this yields. Actors reserve ``min(1, cores / k)`` CPUs so that ``k`` fit.
    ``data_path``: the bridge's ``--data-path`` (direct sockets or ordinary calls)."""
    command = bridge_command(k, handler, dev, max_message_bytes, data_path, os.cpu_count() or 1)
    env = worker_env(api_key)
    # Its own Ray, never a cluster some other process left behind on this machine.
    env.setdefault("RAY_ADDRESS", "local")
    dep = Deployment(f"bridge-{k}")
    try:
        dep.procs.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        )
        dev.wait_workers(k, dep.check_alive)
        yield dep
    finally:
        _stop(dep.procs)


# --- a Ray cluster of raylets on this machine ---------------------------------

# Environment the cluster's drivers and raylets must not take from ours: a test
# session's ``ray.init`` leaves ``RAY_AUTH_MODE=token`` and ``RAY_ADDRESS`` behind.
_RAY_SESSION_ENV = ("RAY_AUTH_MODE", "RAY_ADDRESS", "METALCORE_WORKER_NODE", "METALCORE_WORKER_POD")


def cluster_env(api_key: str, ray_tmpdir: str) -> dict[str, str]:
    """The environment of a cluster's raylets and of the bridge CLI that joins it:
    :func:`worker_env` with token auth off (the drivers hold no token; the
    fake-autoscaler tests do the same), Ray's files under ``ray_tmpdir`` and no
    node identity of this process (each worker node gets its own)."""
    env = {k: v for k, v in worker_env(api_key).items() if k not in _RAY_SESSION_ENV}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmpdir)
    return env


class ClusterHost:
    """``benchmarks/cluster_host.py`` as a child process: a head with 0 CPUs and
    ``workers`` worker nodes named ``bench-worker-<i>`` (``METALCORE_WORKER_NODE``).
    ``address`` is its GCS address; :meth:`close` shuts it down and ends whatever
    of its process group is left."""

    def __init__(
        self,
        api_key: str,
        log: IO[str],
        workers: int = 1,
        worker_cpus: float = 2,
        object_store_mb: int = 150,
    ) -> None:
        # Short: Ray's socket paths live under it and must stay below 108 bytes.
        self.tmpdir = tempfile.mkdtemp(prefix="rbc", dir="/tmp")
        self.env = cluster_env(api_key, self.tmpdir)
        command = [sys.executable, str(ROOT / "benchmarks" / "cluster_host.py")]
        command += ["--workers", str(workers), "--worker-cpus", f"{worker_cpus:g}"]
        command += ["--object-store-mb", str(object_store_mb)]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"Ray cluster did not start (exit code {self.proc.wait()})")
            ready = json.loads(line)
        except BaseException:
            self.close()
            raise
        self.address: str = ready["address"]
        self.nodes: dict[str, str] = ready["nodes"]
        """Worker nodes: Ray node id -> ``METALCORE_WORKER_NODE``."""
        self._lock = threading.Lock()

    def command(self, *words: str) -> dict[str, Any]:
        """``add NAME`` or ``remove NODE_ID`` (``cluster_host.py``); keeps :attr:`nodes`."""
        with self._lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(" ".join(words) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"Ray cluster ended (exit code {self.proc.wait()})")
            answer: dict[str, Any] = json.loads(line)
            if "node_id" in answer:
                self.nodes[answer["node_id"]] = answer["name"]
            elif "removed" in answer:
                self.nodes.pop(answer["removed"], None)
            return answer

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(STOP_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Ray starts its processes in our session's group: none outlives the cluster.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@functools.cache
def cli_flags() -> str:
    """``python -m ray_alpcrun.bridge --help`` of the installed CLI, to tell which
    flags it knows (``--bridges`` is newer than the benchmark)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "ray_alpcrun.bridge", "--help"]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def cli_knows_bridges() -> bool:
    return "--bridges" in cli_flags()


@contextmanager
def cluster_bridge(
    host: ClusterHost, command: list[str], dev: DevServer, k: int, log: IO[str]
) -> Iterator[Deployment]:
    """The bridge CLI ``command`` joined to ``host`` (``--ray-address`` added); yields
    once ``k`` logical workers are registered, stops the CLI (draining) at the end.
    The deployment's processes: the cluster host (its tree is the cluster's), the CLI."""
    dep = Deployment(f"bridge-cluster-{k}", [host.proc])
    try:
        dep.procs.append(
            subprocess.Popen(
                [*command, "--ray-address", host.address],
                env=host.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        # Node bridges: the coordinator's placeholder on the head does not count.
        one = "--bridges" in command and command[command.index("--bridges") + 1] == "one"
        head = None if one or not cli_knows_bridges() else default_node()
        dev.wait_workers(k, dep.check_alive, off_node=head)
        yield dep
    finally:
        _stop(dep.procs[1:])


@contextmanager
def bridge_cluster(
    k: int,
    handler: str,
    dev: DevServer,
    api_key: str,
    max_message_bytes: int,
    log: IO[str],
    data_path: str = "direct",
    bridges: str | None = None,
    worker_cpus: float = 2,
    object_store_mb: int = 600,
) -> Iterator[Deployment]:
    """The bridge CLI (the :func:`bridge` flags plus ``--ray-address``) on the head of
    a :class:`ClusterHost` with one worker node of ``worker_cpus`` CPUs, where the
    ``k`` actors go; registered when this yields. ``bridges``: ``--bridges`` (passed
    only when given; a CLI without the flag is an error then)."""
    if bridges is not None and not cli_knows_bridges():
        raise RuntimeError("this bridge CLI has no --bridges flag")
    command = bridge_command(k, handler, dev, max_message_bytes, data_path, worker_cpus)
    if bridges is not None:
        command += ["--bridges", bridges]
    host = ClusterHost(api_key, log, workers=1, worker_cpus=worker_cpus,
                       object_store_mb=object_store_mb)  # fmt: skip
    try:
        with cluster_bridge(host, command, dev, k, log) as dep:
            yield dep
    finally:
        host.close()  # after the CLI: it drains first, its actors go with it


# --- memory -----------------------------------------------------------------


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants now (from ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def pss_kb(pid: int) -> int:
    """Proportional set size of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def total_pss_mb(roots: list[int]) -> float:
    return sum(pss_kb(pid) for pid in process_tree(roots)) / 1024.0


class PssSampler:
    """Samples the total PSS of some process trees in a thread; ``peak_mb`` since ``reset``."""

    def __init__(self, roots: Callable[[], list[int]], interval_s: float = 0.5) -> None:
        self._roots = roots
        self.interval_s = interval_s
        """Seconds between samples; may be changed while sampling."""
        self._peak_mb = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)

    def sample(self) -> float:
        value = total_pss_mb(self._roots())
        with self._lock:
            self._peak_mb = max(self._peak_mb, value)
        return value

    def reset(self) -> None:
        with self._lock:
            self._peak_mb = 0.0
        self.sample()

    @property
    def peak_mb(self) -> float:
        self.sample()
        with self._lock:
            return self._peak_mb

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
