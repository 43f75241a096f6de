"""NVML, the GPU health side: find the NVML device behind a CUDA device, read it.

NVML numbers every GPU on the machine and ignores ``CUDA_VISIBLE_DEVICES``,
which Ray sets for each actor; CUDA numbers only the visible ones. The two are
matched by UUID (or PCI bus id), never by index. Every function takes the NVML
module as a parameter (``pynvml`` by default, imported lazily) so tests can pass
a fake.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol, TypedDict, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML's device handles are opaque pointers: only handed back to NVML.
NvmlHandle = object


class _Memory(Protocol):
    used: int
    total: int


class _Utilization(Protocol):
    gpu: int


class _PciInfo(Protocol):
    busId: str | bytes


class Nvml(Protocol):
    """The part of ``pynvml`` used here (the module itself, or a test's fake)."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> NvmlHandle: ...
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> NvmlHandle: ...
    def nvmlDeviceGetIndex(self, handle: NvmlHandle) -> int: ...
    def nvmlDeviceGetUUID(self, handle: NvmlHandle) -> str | bytes: ...
    def nvmlDeviceGetName(self, handle: NvmlHandle) -> str | bytes: ...
    def nvmlDeviceGetPciInfo(self, handle: NvmlHandle) -> _PciInfo: ...
    def nvmlDeviceGetMemoryInfo(self, handle: NvmlHandle) -> _Memory: ...
    def nvmlDeviceGetUtilizationRates(self, handle: NvmlHandle) -> _Utilization: ...
    def nvmlDeviceGetTemperature(self, handle: NvmlHandle, sensor: int) -> int: ...


class CudaRuntime(Protocol):
    """The part of ``cupy.cuda.runtime`` used here (or a test's fake)."""

    def getDeviceProperties(self, device: int) -> Mapping[str, object]: ...
    def deviceGetPCIBusId(self, device: int) -> str: ...


class GpuReading(TypedDict):
    """One device's NVML readings; what the device does not support is ``None``."""

    index: int | None
    uuid: str | None
    name: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_pct: int | None
    temperature_c: int | None


def uuid_hex(value: str | bytes | bytearray) -> str:
    """A GPU UUID as 32 lower-case hex digits, whatever its spelling.

    Accepts CUDA's 16 raw bytes (``cudaDeviceProp.uuid``), NVML's
    ``"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"`` (str or bytes) and the bare hex.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            text = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return bytes(value).hex()
        if not _looks_textual(text):
            return bytes(value).hex()
        value = text
    text = value.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text.replace("-", "")


def _looks_textual(text: str) -> bool:
    stripped = text.strip().lower()
    body = stripped[4:] if stripped.startswith(("gpu-", "mig-")) else stripped
    return len(body) >= 32 and all(c in "0123456789abcdef-" for c in body)


def nvml_uuid(raw: bytes | bytearray) -> str:
    """CUDA's 16 raw UUID bytes spelled the way NVML does: ``GPU-8-4-4-4-12`` hex."""
    h = bytes(raw[:16]).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _pci_key(bus_id: str | bytes | None) -> tuple[int, int, int, int] | None:
    """``domain:bus:device.function`` as numbers: CUDA writes a 4-digit domain, NVML 8."""
    if bus_id is None:
        return None
    if isinstance(bus_id, bytes):
        bus_id = bus_id.decode("ascii", "replace")
    try:
        domain, bus, rest = bus_id.strip().rstrip("\x00").split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class CudaIdentity:
    """What CUDA says about one visible device."""

    cuda_index: int
    uuid_raw: bytes
    pci_bus_id: str | None
    name: str
    total_memory_bytes: int


def cuda_identity(runtime: CudaRuntime, cuda_index: int = 0) -> CudaIdentity:
    """Read a visible device's identity through ``cupy.cuda.runtime`` (or a fake of it)."""
    props = runtime.getDeviceProperties(cuda_index)
    raw_name = props.get("name", b"")
    name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else str(raw_name)
    try:
        pci: str | None = runtime.deviceGetPCIBusId(cuda_index)
    except Exception:  # older CuPy or a HIP build: the UUID alone will do
        pci = None
    total = props.get("totalGlobalMem", 0)
    return CudaIdentity(
        cuda_index=cuda_index,
        uuid_raw=_raw_bytes(props.get("uuid", b"")),
        pci_bus_id=pci,
        name=name.rstrip("\x00"),
        total_memory_bytes=total if isinstance(total, int) else 0,
    )


def find_nvml_device(nvml: Nvml, identity: CudaIdentity) -> tuple[int, NvmlHandle]:
    """The NVML (index, handle) of the GPU CUDA calls ``identity``.

    Tries ``nvmlDeviceGetHandleByUUID`` first, then scans every NVML device
    comparing UUIDs and PCI bus ids. The scan copes with a UUID cut short:
    Cython turns ``char[16]`` into bytes up to the first NUL, so CuPy may hand
    over fewer than 16 bytes (then a unique prefix match is accepted).
    Raises LookupError when nothing matches unambiguously.
    """
    raw = identity.uuid_raw
    if len(raw) >= 16:
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(nvml_uuid(raw))
            return int(nvml.nvmlDeviceGetIndex(handle)), handle
        except Exception as exc:
            log.debug("nvmlDeviceGetHandleByUUID(%s) failed (%s); scanning", nvml_uuid(raw), exc)
    want_hex = raw[:16].hex()
    want_pci = _pci_key(identity.pci_bus_id)
    by_uuid: list[tuple[int, NvmlHandle]] = []
    by_prefix: list[tuple[int, NvmlHandle]] = []
    by_pci: list[tuple[int, NvmlHandle]] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        have_hex = uuid_hex(nvml.nvmlDeviceGetUUID(handle))
        if want_hex and have_hex == want_hex:
            by_uuid.append((index, handle))
        elif 0 < len(want_hex) < 32 and have_hex.startswith(want_hex + "00"):
            by_prefix.append((index, handle))
        if want_pci is not None:
            try:
                if _pci_key(nvml.nvmlDeviceGetPciInfo(handle).busId) == want_pci:
                    by_pci.append((index, handle))
            except Exception:
                pass  # no PCI info (e.g. a vGPU); the UUID decides
    for matches in (by_uuid, by_pci, by_prefix):
        if len(matches) == 1:
            return matches[0]
    raise LookupError(
        f"no unique NVML device matches CUDA device {identity.cuda_index} "
        f"(uuid {want_hex or '?'}, pci {identity.pci_bus_id or '?'})"
    )


def import_nvml() -> Nvml:
    import pynvml

    nvml: Nvml = pynvml
    return nvml


def _raw_bytes(value: object) -> bytes:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else b""


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_nvml(nvml: Nvml, handle: NvmlHandle, index: int | None = None) -> GpuReading:
    """One device's readings; a reading the device does not support is ``None``."""

    def attempt(fn: Callable[..., T], *args: int) -> T | None:
        try:
            return fn(handle, *args)
        except Exception:
            return None

    memory = attempt(nvml.nvmlDeviceGetMemoryInfo)
    util = attempt(nvml.nvmlDeviceGetUtilizationRates)
    temp = attempt(nvml.nvmlDeviceGetTemperature, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
    uuid = attempt(nvml.nvmlDeviceGetUUID)
    name = attempt(nvml.nvmlDeviceGetName)
    return {
        "index": index,
        "uuid": _text(uuid) if uuid is not None else None,
        "name": _text(name) if name is not None else None,
        "memory_used_bytes": int(memory.used) if memory is not None else None,
        "memory_total_bytes": int(memory.total) if memory is not None else None,
        "utilization_pct": int(util.gpu) if util is not None else None,
        "temperature_c": int(temp) if temp is not None else None,
    }


def nvml_devices(nvml: Nvml | None = None) -> list[GpuReading]:
    """Readings for every GPU on this machine (for a status call); ``[]`` without NVML."""
    try:
        nvml = nvml if nvml is not None else import_nvml()
        nvml.nvmlInit()
    except Exception as exc:
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        return [
            read_nvml(nvml, nvml.nvmlDeviceGetHandleByIndex(i), i)
            for i in range(int(nvml.nvmlDeviceGetCount()))
        ]
    except Exception as exc:
        log.warning("reading NVML devices failed: %s", exc)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)


def open_device(
    nvml: Nvml | None, identity: CudaIdentity
) -> tuple[Nvml | None, NvmlHandle | None, int | None]:
    """Initialise NVML and find ``identity``: ``(nvml, handle, index)``, or Nones (logged)."""
    try:
        nvml = nvml if nvml is not None else import_nvml()
        nvml.nvmlInit()
    except Exception as exc:
        log.warning("NVML unavailable (%s): GPU readings limited to CUDA's memory figures", exc)
        return None, None, None
    try:
        index, handle = find_nvml_device(nvml, identity)
    except Exception as exc:
        log.warning("cannot match the CUDA device to NVML (%s): no NVML readings", exc)
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)
        return None, None, None
    return nvml, handle, index
