"""GPUs for pool actors: CuPy to compute with, NVML to report device health.

Cheap to import: CuPy, NVML (``pynvml``) and Ray are imported inside the
functions that need them, so a machine without CUDA imports this module fine.

Inside a GPU actor::

    device = setup_device(memory_limit_bytes=8 << 30)   # None on a CPU actor
    runtime = HandlerRuntime(handler, xp=device.xp, device=device,
                             to_device=device.to_device)
    device.status()   # {"uuid": "GPU-...", "memory_used_bytes": ..., ...}

Ray hides the other GPUs from an actor with ``CUDA_VISIBLE_DEVICES``, so CUDA
device 0 is the actor's GPU. NVML ignores that variable and numbers every GPU
on the machine, so the two are matched by UUID (falling back to the PCI bus
id), never by index.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ray_alpcrun.errors import ConfigError
from ray_alpcrun.pool.nvml import (
    CudaIdentity,
    GpuReading,
    Nvml,
    NvmlHandle,
    cuda_identity,
    find_nvml_device,
    nvml_devices,
    nvml_uuid,
    open_device,
    read_nvml,
    uuid_hex,
)

__all__ = [
    "CPU_FALLBACK",
    "CudaIdentity",
    "Device",
    "active_device",
    "array_module",
    "check_gpu_request",
    "find_nvml_device",
    "nvml_devices",
    "setup_device",
    "uuid_hex",
]

log = logging.getLogger(__name__)

# Fractions of a GPU are summed in floating point; allow for rounding.
_EPS = 1e-9


class _LogOnce:
    """Logs the CPU-fallback reason once per process (actors are processes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None

    def note(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        log.info("no GPU for this process, computing with NumPy on the CPU: %s", reason)

    def reset(self) -> None:
        with self._lock:
            self.reason = None


CPU_FALLBACK = _LogOnce()

# The device set up in this process, for array_module(); one actor = one process.
_active_device: Device | None = None


# ---------------------------------------------------------------- requests


def check_gpu_request(num_actors: int, gpus_per_actor: float, cluster_gpus: float) -> None:
    """Fail fast when ``num_actors`` actors of ``gpus_per_actor`` GPUs cannot all be placed.

    Ray places a fractional GPU request (< 1) on a single GPU, so with 0.4 GPU
    per actor each GPU holds two actors, not two and a half. Requests above one
    GPU must be whole numbers. ``cluster_gpus`` is ``ray.cluster_resources().get("GPU", 0)``.

    >>> check_gpu_request(4, 0.5, 2.0)   # fits
    """
    if gpus_per_actor < 0:
        raise ConfigError(f"--gpus-per-actor must not be negative, got {gpus_per_actor:g}")
    if gpus_per_actor == 0:
        return
    if gpus_per_actor > 1 and abs(gpus_per_actor - round(gpus_per_actor)) > _EPS:
        raise ConfigError(
            f"--gpus-per-actor {gpus_per_actor:g}: Ray only shares a GPU for requests below 1; "
            "above 1 it must be a whole number"
        )
    needed = num_actors * gpus_per_actor
    if cluster_gpus <= 0:
        raise ConfigError(
            f"{num_actors} actor(s) x {gpus_per_actor:g} GPU asked for, but the Ray cluster has "
            "no GPUs (ray.cluster_resources() shows none); run with --gpus-per-actor 0 for CPU "
            "actors, or start Ray on a machine with GPUs"
        )
    whole_gpus = int(cluster_gpus + _EPS)
    if gpus_per_actor < 1:
        per_gpu = int(1 / gpus_per_actor + _EPS)
        capacity = whole_gpus * per_gpu
        fits = num_actors <= capacity
        detail = f"{per_gpu} actor(s) fit on each of the {whole_gpus} GPU(s): at most {capacity}"
    else:
        fits = needed <= cluster_gpus + _EPS
        detail = f"at most {int(cluster_gpus // gpus_per_actor)} actor(s) fit"
    if not fits:
        raise ConfigError(
            f"{num_actors} actor(s) x {gpus_per_actor:g} GPU = {needed:g} GPU(s) asked for, but "
            f"the Ray cluster has {cluster_gpus:g} GPU(s) ({detail}); lower --actors or "
            "--gpus-per-actor"
        )


# ---------------------------------------------------------------- the device


class DeviceStatus(GpuReading):
    """A GPU actor's device for a status call: NVML's readings and CuPy's pool."""

    pool_limit_bytes: int | None
    pool_used_bytes: int
    pool_held_bytes: int
    ray_gpu_ids: list[str]


class Device:
    """The CUDA device a GPU actor computes on (CUDA index 0 of its visible set)."""

    def __init__(
        self,
        *,
        cupy: ModuleType,
        identity: CudaIdentity,
        nvml: Nvml | None = None,
        nvml_handle: NvmlHandle | None = None,
        nvml_index: int | None = None,
        pool_limit_bytes: int | None = None,
        ray_gpu_ids: Sequence[str] = (),
    ) -> None:
        self._cupy = cupy
        self.identity = identity
        self._nvml = nvml
        self._nvml_handle = nvml_handle
        self.nvml_index = nvml_index
        self.pool_limit_bytes = pool_limit_bytes
        self.ray_gpu_ids = tuple(str(g) for g in ray_gpu_ids)

    @property
    def xp(self) -> ModuleType:
        """The array module (``cupy``)."""
        return self._cupy

    @property
    def uuid(self) -> str:
        raw = self.identity.uuid_raw
        return nvml_uuid(raw) if len(raw) >= 16 else raw.hex()

    @property
    def name(self) -> str:
        return self.identity.name

    def make_current(self) -> None:
        """Make this the calling thread's CUDA device (CUDA keeps one per thread)."""
        self._cupy.cuda.Device(self.identity.cuda_index).use()

    def to_device(self, obj: Any) -> Any:
        """Copy NumPy arrays to the GPU, recursing into dicts, lists, tuples and dataclasses.

        Everything else is returned as is, so decoded shared data of any shape can be
        passed through (``HandlerRuntime(to_device=device.to_device)``).
        """
        import numpy as np

        cp = self._cupy

        def move(x: object) -> object:
            if isinstance(x, np.ndarray):
                return cp.asarray(x)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            if isinstance(x, tuple):
                items = [move(v) for v in x]
                make: Callable[..., object] = type(x)  # a namedtuple takes its fields
                return make(*items) if hasattr(x, "_fields") else tuple(items)
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                changes = {
                    f.name: move(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init
                }
                return dataclasses.replace(x, **changes)
            return x

        with cp.cuda.Device(self.identity.cuda_index):
            return move(obj)

    def to_host(self, x: Any) -> Any:
        """Copy CuPy arrays back to NumPy (recursing like :meth:`to_device`)."""
        cp = self._cupy
        if isinstance(x, cp.ndarray):
            return cp.asnumpy(x)
        if isinstance(x, dict):
            return {k: self.to_host(v) for k, v in x.items()}
        if isinstance(x, list):
            return [self.to_host(v) for v in x]
        if isinstance(x, tuple):
            items = [self.to_host(v) for v in x]
            return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
        return x

    def free(self) -> None:
        """Give the memory pools' unused blocks back to CUDA (e.g. after a session ends)."""
        self._cupy.get_default_memory_pool().free_all_blocks()
        self._cupy.get_default_pinned_memory_pool().free_all_blocks()

    def status(self) -> DeviceStatus:
        """Readings for a status call: identity, memory, utilisation, temperature, pool use."""
        reading: GpuReading
        if self._nvml is not None and self._nvml_handle is not None:
            reading = read_nvml(self._nvml, self._nvml_handle, self.nvml_index)
        else:
            reading = {
                "index": None,
                "uuid": None,
                "name": None,
                "memory_used_bytes": None,
                "memory_total_bytes": None,
                "utilization_pct": None,
                "temperature_c": None,
            }
            try:
                with self._cupy.cuda.Device(self.identity.cuda_index):
                    free_b, total_b = self._cupy.cuda.runtime.memGetInfo()
                reading["memory_used_bytes"] = int(total_b - free_b)
                reading["memory_total_bytes"] = int(total_b)
            except Exception:
                log.debug("cudaMemGetInfo failed", exc_info=True)
        reading["uuid"] = reading["uuid"] or self.uuid
        reading["name"] = reading["name"] or self.name
        pool = self._cupy.get_default_memory_pool()
        status: DeviceStatus = {
            **reading,
            "pool_limit_bytes": self.pool_limit_bytes,
            "pool_used_bytes": int(pool.used_bytes()),
            "pool_held_bytes": int(pool.total_bytes()),
            "ray_gpu_ids": list(self.ray_gpu_ids),
        }
        return status

    def close(self) -> None:
        """Free the pools and let go of NVML."""
        self.free()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)
            self._nvml = None
            self._nvml_handle = None

    def __repr__(self) -> str:
        return f"Device({self.name!r}, uuid={self.uuid}, nvml_index={self.nvml_index})"


def _ray_assignment() -> tuple[list[str], float | None]:
    """The GPUs Ray gave this worker process and how much of a GPU it asked for.

    ``([], None)`` outside Ray or without GPUs.
    """
    if "ray" not in sys.modules:  # not inside a Ray worker: nothing was assigned
        return [], None
    import ray

    if not ray.is_initialized():
        return [], None
    try:
        ctx = ray.get_runtime_context()
        ids = [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]
    except Exception as exc:
        log.debug("cannot read Ray's accelerator ids: %s", exc)
        return [], None
    try:
        amount = ctx.get_assigned_resources().get("GPU")
    except Exception:
        amount = None
    return ids, float(amount) if amount is not None else None


def setup_device(
    memory_limit_bytes: int | None = None,
    gpu_ids: Sequence[str | int] | None = None,
    *,
    memory_fraction: float | None = None,
    cupy_module: ModuleType | None = None,
    nvml: Nvml | None = None,
) -> Device | None:
    """Set up this actor's GPU, or return ``None`` to compute on the CPU.

    ``gpu_ids`` are the GPUs Ray assigned (looked up from the runtime context
    when omitted). With none, or when CuPy, CUDA or a device is missing, the
    reason is logged once per process and ``None`` comes back. Otherwise CUDA
    device 0 (the first GPU Ray made visible) becomes current, CuPy's default
    memory pool is capped at ``memory_limit_bytes`` or ``memory_fraction`` of the
    device (actors sharing a GPU share its memory; a fractional Ray GPU implies
    that fraction when no cap is given), and the NVML handle is found by UUID.
    NVML missing only loses the readings. ``cupy_module`` and ``nvml`` stand in
    for the real modules in tests.
    """
    global _active_device
    if gpu_ids is None:
        ids, amount = _ray_assignment()
        if (
            amount is not None
            and 0 < amount < 1
            and memory_fraction is None
            and memory_limit_bytes is None
        ):
            # A fractional GPU shares the device's memory with other actors: take our share.
            memory_fraction = amount
    else:
        ids = [str(g) for g in gpu_ids]
    if not ids:
        CPU_FALLBACK.note("no GPU assigned to this actor (gpus_per_actor = 0)")
        return None
    if memory_limit_bytes is not None and memory_limit_bytes <= 0:
        raise ConfigError("memory_limit_bytes must be positive")
    if memory_fraction is not None and not 0 < memory_fraction <= 1:
        raise ConfigError("memory_fraction must be in (0, 1]")
    cupy = cupy_module
    if cupy is None:
        try:
            cupy = importlib.import_module("cupy")
        except Exception as exc:
            CPU_FALLBACK.note(f"GPU(s) {ids} assigned but CuPy cannot be imported ({exc})")
            return None
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
        if count < 1:
            raise RuntimeError("CUDA sees no device")
        index = _cuda_index(ids, count)
        cupy.cuda.Device(index).use()
        identity = cuda_identity(cupy.cuda.runtime, index)
    except Exception as exc:
        CPU_FALLBACK.note(f"GPU(s) {ids} assigned but CUDA is not usable ({exc})")
        return None

    pool = cupy.get_default_memory_pool()
    limit = memory_limit_bytes
    if memory_fraction is not None and identity.total_memory_bytes:
        by_fraction = int(identity.total_memory_bytes * memory_fraction)
        limit = by_fraction if limit is None else min(limit, by_fraction)
    if limit is not None:
        pool.set_limit(size=limit)

    nvml_mod, handle, nvml_index = open_device(nvml, identity)
    device = Device(
        cupy=cupy,
        identity=identity,
        nvml=nvml_mod,
        nvml_handle=handle,
        nvml_index=nvml_index,
        pool_limit_bytes=limit,
        ray_gpu_ids=ids,
    )
    reading = device.status()
    log.info(
        "GPU actor on %s (%s, NVML index %s, Ray GPU ids %s): %s of %s used, %s%% busy, %s C, "
        "CuPy pool limit %s",
        device.name,
        device.uuid,
        nvml_index,
        ",".join(ids),
        _gib(reading["memory_used_bytes"]),
        _gib(reading["memory_total_bytes"] or identity.total_memory_bytes),
        reading["utilization_pct"],
        reading["temperature_c"],
        _gib(limit) if limit is not None else "none",
    )
    _active_device = device
    return device


def _cuda_index(ids: Sequence[str], count: int) -> int:
    """Which visible CUDA device is ours: 0, as Ray narrows ``CUDA_VISIBLE_DEVICES`` to
    the assigned GPUs; unless more devices are visible than assigned (Ray told not
    to set the variable), when Ray's id is the CUDA index."""
    first = ids[0]
    if count > len(ids) and first.isdigit() and int(first) < count:
        return int(first)
    return 0


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def active_device() -> Device | None:
    """The device :func:`setup_device` set up in this process, if any."""
    return _active_device


def array_module(obj: object = None) -> ModuleType:
    """CuPy for a CuPy array or on a GPU actor, NumPy otherwise.

    >>> xp = array_module()          # numpy in a CPU actor
    >>> xp = array_module(some_array)  # follows where the array lives
    """
    cp = sys.modules.get("cupy")  # never import CuPy just to answer "no"
    if obj is not None:
        if cp is not None and isinstance(obj, cp.ndarray):
            return cp
        import numpy

        return numpy
    if _active_device is not None:
        return _active_device.xp
    import numpy

    return numpy
