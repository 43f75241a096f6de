"""Fakes of the CuPy and NVML boundaries, for GPU logic tests on machines without a GPU.

A fake machine has physical GPUs (what NVML lists, in PCI order); CuPy sees the
subset ``visible`` in that order, renumbered from 0, as CUDA does under
``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import uuid as uuid_mod
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

GIB = 1 << 30


@dataclass
class FakeGpu:
    uuid_bytes: bytes
    pci: str  # NVML spelling: 8-digit domain, e.g. "00000000:3B:00.0"
    name: str = "Fake H100"
    total_bytes: int = 80 * GIB
    used_bytes: int = 1 * GIB
    util_pct: int = 7
    temp_c: int = 41

    @property
    def nvml_uuid(self) -> str:
        return "GPU-" + str(uuid_mod.UUID(bytes=self.uuid_bytes))

    @property
    def cuda_pci(self) -> str:  # CUDA spelling: 4-digit domain
        domain, rest = self.pci.split(":", 1)
        return f"{int(domain, 16):04x}:{rest}"


def machine() -> list[FakeGpu]:
    """Two GPUs; the second one's UUID has a zero byte (CuPy may cut it short there)."""
    return [
        FakeGpu(bytes.fromhex("8a6f1c2e9b3d4e5fa1b2c3d4e5f60718"), "00000000:3B:00.0"),
        FakeGpu(
            bytes.fromhex("5c3e9a0000112233445566778899aabb"),
            "00000000:AF:00.0",
            used_bytes=3 * GIB,
            util_pct=93,
            temp_c=67,
        ),
    ]


class FakeNvml:
    """The slice of ``pynvml`` that ray_alpcrun uses."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[FakeGpu], by_uuid_works: bool = True) -> None:
        self.gpus = gpus
        self.by_uuid_works = by_uuid_works
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> tuple[str, int]:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for i, gpu in enumerate(self.gpus):
            if self.by_uuid_works and gpu.nvml_uuid == text:
                return ("handle", i)
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, handle: tuple[str, int]) -> int:
        return handle[1]

    def _gpu(self, handle: tuple[str, int]) -> FakeGpu:
        return self.gpus[handle[1]]

    def nvmlDeviceGetUUID(self, handle: tuple[str, int]) -> str:
        return self._gpu(handle).nvml_uuid

    def nvmlDeviceGetName(self, handle: tuple[str, int]) -> bytes:
        return self._gpu(handle).name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetPciInfo(self, handle: tuple[str, int]) -> Any:
        return SimpleNamespace(busId=self._gpu(handle).pci.encode())

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[str, int]) -> Any:
        g = self._gpu(handle)
        return SimpleNamespace(
            total=g.total_bytes, used=g.used_bytes, free=g.total_bytes - g.used_bytes
        )

    def nvmlDeviceGetUtilizationRates(self, handle: tuple[str, int]) -> Any:
        return SimpleNamespace(gpu=self._gpu(handle).util_pct, memory=0)

    def nvmlDeviceGetTemperature(self, handle: tuple[str, int], sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._gpu(handle).temp_c


class FakeArray:
    """Stands for a cupy.ndarray: wraps a NumPy array 'on the device'."""

    def __init__(self, data: Any) -> None:
        self.data = np.asarray(data)

    def get(self) -> Any:
        return self.data


class FakePool:
    def __init__(self) -> None:
        self.limit: int | None = None
        self.freed = 0

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        self.limit = size

    def used_bytes(self) -> int:
        return 1234

    def total_bytes(self) -> int:
        return 4096

    def free_all_blocks(self) -> None:
        self.freed += 1


class _FakeDevice:
    def __init__(self, cupy: FakeCupy, index: int) -> None:
        self.cupy, self.index = cupy, index

    def use(self) -> None:
        self.cupy.current = self.index

    def __enter__(self) -> _FakeDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _FakeRuntime:
    def __init__(self, cupy: FakeCupy) -> None:
        self.cupy = cupy

    def getDeviceCount(self) -> int:
        if self.cupy.broken:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return len(self.cupy.visible)

    def _gpu(self, index: int) -> FakeGpu:
        return self.cupy.gpus[self.cupy.visible[index]]

    def getDeviceProperties(self, index: int) -> dict[str, Any]:
        gpu = self._gpu(index)
        raw = gpu.uuid_bytes
        if self.cupy.truncate_uuid_at_nul and b"\0" in raw:
            raw = raw[: raw.index(b"\0")]  # how a char[16] can come through Cython
        return {"name": gpu.name.encode(), "uuid": raw, "totalGlobalMem": gpu.total_bytes}

    def deviceGetPCIBusId(self, index: int) -> str:
        return self._gpu(index).cuda_pci

    def memGetInfo(self) -> tuple[int, int]:
        gpu = self._gpu(self.cupy.current)
        return gpu.total_bytes - gpu.used_bytes, gpu.total_bytes


class FakeCupy:
    """The slice of ``cupy`` that ray_alpcrun.pool.gpu uses; arrays are :class:`FakeArray`."""

    ndarray = FakeArray

    def __init__(
        self,
        gpus: list[FakeGpu],
        visible: list[int],
        *,
        truncate_uuid_at_nul: bool = False,
        broken: bool = False,
    ) -> None:
        self.gpus, self.visible = gpus, visible
        self.truncate_uuid_at_nul = truncate_uuid_at_nul
        self.broken = broken
        self.current = 0
        self.pool, self.pinned_pool = FakePool(), FakePool()
        self.cuda = SimpleNamespace(
            runtime=_FakeRuntime(self), Device=lambda i=0: _FakeDevice(self, i)
        )

    def get_default_memory_pool(self) -> FakePool:
        return self.pool

    def get_default_pinned_memory_pool(self) -> FakePool:
        return self.pinned_pool

    def asarray(self, x: Any) -> FakeArray:
        return x if isinstance(x, FakeArray) else FakeArray(x)

    def asnumpy(self, x: FakeArray) -> Any:
        return x.data
