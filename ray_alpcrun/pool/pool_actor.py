"""The pool's Ray actor: one :class:`~ray_alpcrun.runtime.HandlerRuntime` per actor process.

A plain class; :mod:`ray_alpcrun.pool.actor_pool` applies ``ray.remote`` with its options.
Calls run one at a time (the handler needs no locks), except ``ready`` and
``status``, which answer from a second thread so that a busy or hung handler
does not make the actor look dead. The direct path (:mod:`ray_alpcrun.pool.direct`)
runs frames from its socket's thread, so the handler's runtime is also guarded
by a lock: an ordinary call and a socket frame never run the handler at the
same time.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import ray
from ray import cloudpickle

from ray_alpcrun.errors import SessionSetupError
from ray_alpcrun.handler import load_handler
from ray_alpcrun.logs import setup_logging
from ray_alpcrun.pool import sockets
from ray_alpcrun.pool.gpu import Device, setup_device
from ray_alpcrun.runtime import HandlerRuntime, Outcome, SharedSpec, describe

log = logging.getLogger(__name__)

CONTROL_GROUP = "control"
"""Concurrency group of the methods that must answer while ``run`` is busy."""


@dataclass(frozen=True, slots=True)
class SharedRef:
    """A session's shared data in the object store, as handed to the actors.

    The ``ObjectRef`` sits inside this container so Ray passes it along without
    resolving it on every call: an actor fetches it only when it has not decoded
    that (session, level) yet.
    """

    session_id: str
    level: int | None
    ref: object  # a ray.ObjectRef: opaque here, handed back to ray.get


# ``run`` answers its outcomes and the seconds the handler took, or a string:
# the session could not be set up.
RunReply = tuple[list[Outcome], float] | str
# ``run``'s arguments: session id, payloads, shared data, session tags.
RunArgs = tuple[str, list[bytes], SharedRef | None, tuple[str, ...]]
# ``open_direct``'s offer: the socket's path and the pid of the actor serving it.
DirectOffer = tuple[str, int]
# ``ready``/``status``: JSON-like facts about the actor (pid, host, device, counters).
ActorInfo = dict[str, object]

R_co = TypeVar("R_co", covariant=True)


class RemoteMethod(Protocol[R_co]):
    """One actor method behind Ray: ``remote(...)`` starts the call, its ObjectRef
    is awaited for the reply."""

    def remote(self, *args: object) -> Awaitable[R_co]: ...


class PoolActorHandle(Protocol):
    """A :class:`PoolActor` as Ray hands it out (its ``ActorHandle``)."""

    @property
    def ready(self) -> RemoteMethod[ActorInfo]: ...
    @property
    def run(self) -> RemoteMethod[RunReply]: ...
    @property
    def run_many(self) -> RemoteMethod[list[RunReply]]: ...
    @property
    def end_session(self) -> RemoteMethod[bool]: ...
    @property
    def close_sessions(self) -> RemoteMethod[int]: ...
    @property
    def status(self) -> RemoteMethod[ActorInfo]: ...
    @property
    def open_direct(self) -> RemoteMethod[DirectOffer | None]: ...
    @property
    def __ray_call__(self) -> RemoteMethod[None]: ...


class PoolActorClass(Protocol):
    """``ray.remote(PoolActor).options(...)``: creates one actor."""

    def remote(
        self,
        handler_blob: bytes,
        *,
        max_sessions: int,
        use_gpu: bool,
        gpu_memory_limit_bytes: int | None,
        memory_limit_bytes: int | None,
        sys_path: list[str],
        log: tuple[str | None, bool],
    ) -> PoolActorHandle: ...


class PoolActor:
    """Runs a handler's tasks in a Ray actor.

    ``handler_blob`` is the cloudpickled handler spec (a ``module:object``
    string, a function, a Handler class or instance). It is unpickled here, after
    ``sys_path`` (the driver's import path) was added, so handlers that import
    on the driver import here too.
    """

    def __init__(
        self,
        handler_blob: bytes,
        *,
        max_sessions: int,
        use_gpu: bool = False,
        gpu_memory_limit_bytes: int | None = None,
        memory_limit_bytes: int | None = None,
        sys_path: Sequence[str] = (),
        log: tuple[str | None, bool] = (None, False),
    ) -> None:
        level, json_lines = log
        if level is not None:
            setup_logging(level, json_lines)
        if memory_limit_bytes is not None:
            _limit_private_memory(memory_limit_bytes)
        for entry in sys_path:
            if entry not in sys.path:
                sys.path.append(entry)
        self.tasks_done = 0
        self.calls = 0
        self._error: str | None = None
        self._error_kind = "handler"
        self._device: Device | None = None
        self._runtime: HandlerRuntime | None = None
        # Reentrant: a direct frame checks the shared data and runs under one hold.
        self._lock = threading.RLock()
        try:
            self._device = _setup_device(use_gpu, gpu_memory_limit_bytes)
        except Exception as exc:
            self._error, self._error_kind = f"GPU setup failed: {describe(exc)}", "device"
            return
        try:
            handler = load_handler(cloudpickle.loads(handler_blob))
        except Exception as exc:
            self._error = describe(exc)
            return
        self._zero_copy = bool(getattr(handler, "zero_copy_shared", False))
        device = self._device
        if device is not None:
            xp, to_device = device.xp, device.to_device
        else:
            import numpy

            xp, to_device = numpy, None
        self._runtime = HandlerRuntime(
            handler, max_sessions=max_sessions, xp=xp, device=device, to_device=to_device
        )
        # Ray, NumPy and the handler leave ~100k long-lived objects; every full
        # collection would scan them all (tens of ms) while batches churn through
        # short-lived payload lists. Frozen, they are never scanned again.
        gc.freeze()

    @ray.method(concurrency_group=CONTROL_GROUP)  # type: ignore[misc,untyped-decorator]
    def ready(self) -> ActorInfo:
        """Who this actor is; ``error`` (and ``error_kind``) if the handler cannot run."""
        info = self._identity()
        if self._error is not None:
            info["error"] = self._error
            info["error_kind"] = self._error_kind
        else:
            info["handler"] = repr(cast(HandlerRuntime, self._runtime).handler)
        return info

    def run(
        self,
        session_id: str,
        payloads: list[bytes],
        shared: SharedRef | None,
        tags: tuple[str, ...],
    ) -> RunReply:
        """One sub-batch: outcomes in order, or the setup error as a string."""
        runtime = self._runtime
        if runtime is None:
            return f"handler could not be loaded: {self._error}"
        spec = None
        if shared is not None:
            spec = SharedSpec(shared.level, lambda: self._fetch(shared.ref))
        with self._lock:
            self.calls += 1
            started = time.perf_counter()
            try:
                outcomes = runtime.run(session_id, payloads, spec, tags)
            except SessionSetupError as exc:
                return str(exc)
        self.tasks_done += len(outcomes)
        return outcomes, time.perf_counter() - started

    def run_many(self, parts: list[RunArgs]) -> list[RunReply]:
        """Several sub-batches in one call (see :mod:`ray_alpcrun.pool.coalesce`): one
        reply per part, in order, each exactly as :meth:`run` answers it."""
        return [self.run(*part) for part in parts]

    def end_session(self, session_id: str) -> bool:
        """Run the session end hook and drop its state; False if it was not here."""
        with self._lock:
            return self._runtime is not None and self._runtime.end_session(session_id)

    def open_direct(self, bridge_node: str, bridge_pid: int) -> DirectOffer | None:
        """Serve sub-batches on a Unix socket (:mod:`ray_alpcrun.pool.direct`) for the
        bridge process ``bridge_pid`` on this node, and for no other process: the
        socket's path and this actor's pid (the bridge checks who serves it); None
        for a bridge on another node or where peers cannot be told apart. Each call
        offers a new socket that serves one connection (a replaced bridge calls again)."""
        if bridge_node != ray.get_runtime_context().get_node_id() or not sockets.SUPPORTED:
            return None
        return sockets.serve(self._run_direct, bridge_pid), os.getpid()

    def _run_direct(self, parts: list[RunArgs]) -> list[RunReply | None]:
        """One frame of the direct path: each part as :meth:`run` answers it, or None
        when it names shared data (without its reference) not decoded here."""
        if self._device is not None:  # CUDA's current device is per thread
            self._device.make_current()
        out: list[RunReply | None] = []
        for session_id, payloads, shared, tags in parts:
            with self._lock:
                lacking = self._lacks(session_id, shared)
                out.append(None if lacking else self.run(session_id, payloads, shared, tags))
        return out

    def _lacks(self, session_id: str, shared: SharedRef | None) -> bool:
        """Whether ``shared`` is named without its reference and not decoded here."""
        if shared is None or shared.ref is not None:
            return False
        runtime = self._runtime
        return runtime is None or not runtime.has_shared(session_id, shared.level)

    def close_sessions(self) -> int:
        """Before this actor is released: run every session's end hook; how many ran.

        Under the handler's lock, as :meth:`end_session`: a direct frame may still
        be running on the socket's thread, and no end hook may overlap a call."""
        runtime = self._runtime
        if runtime is None:
            return 0
        with self._lock:
            count = len(runtime.session_ids)
            runtime.close()
        return count

    @ray.method(concurrency_group=CONTROL_GROUP)  # type: ignore[misc,untyped-decorator]
    def status(self) -> ActorInfo:
        """Counters for health checks; answers even while ``run`` is busy."""
        info = self._identity()
        runtime = self._runtime
        sessions: list[str] = []
        if runtime is not None:
            try:
                sessions = runtime.session_ids
            except RuntimeError:  # ``run`` (another thread) changed the table meanwhile
                sessions = []
        info.update(
            sessions=sessions,
            shared_decodes=runtime.shared_decodes if runtime is not None else 0,
            tasks_done=self.tasks_done,
            calls=self.calls,
        )
        return info

    def _fetch(self, ref: object) -> bytes:
        """Bring shared data over from the object store (a cache miss in the runtime)."""
        value = ray.get(ref)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        # The pool stores shared data as a uint8 array: Ray hands it back as a
        # read-only view of the node's shared memory, without a copy.
        if self._zero_copy:
            return cast(bytes, memoryview(value))
        return cast(bytes, value.tobytes())

    def _identity(self) -> ActorInfo:
        try:
            context = ray.get_runtime_context()
            node_id, worker_id = context.get_node_id(), context.get_worker_id()
        except Exception:
            node_id = worker_id = None
        device: Mapping[str, object] | None = None
        if self._device is not None:
            try:
                device = self._device.status()
            except Exception as exc:
                device = {"error": describe(exc)}
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": node_id,
            "worker_id": worker_id,  # one per incarnation: a restart has a new one
            "device": device,
        }


def _limit_private_memory(limit_bytes: int) -> None:
    """Cap this process's private data (heap and private mappings; RLIMIT_DATA,
    Linux >= 4.7). Shared mappings such as Ray's object store do not count, so
    zero-copy shared data is unaffected."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, hard))


def _setup_device(use_gpu: bool, memory_limit_bytes: int | None) -> Device | None:
    """The actor's GPU (``ray_alpcrun.pool.gpu``), or None to compute on the CPU with NumPy."""
    if not use_gpu:
        return None
    return setup_device(memory_limit_bytes)
