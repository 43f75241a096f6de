"""GPU support without a GPU: CPU fallback, CUDA-to-NVML mapping with fakes, request checks,
cheap imports, fake GPUs in Ray; plus ``gpu``-marked tests for a real CUDA device."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ray_alpcrun.errors import ConfigError
from ray_alpcrun.pool import gpu
from ray_alpcrun.pool.gpu import (
    CPU_FALLBACK,
    array_module,
    check_gpu_request,
    nvml_devices,
    setup_device,
    uuid_hex,
)
from ray_alpcrun.pool.nvml import CudaIdentity, find_nvml_device, nvml_uuid

TESTS = Path(__file__).resolve().parents[1] / "support"  # fake_gpu is imported by name
sys.path.insert(0, str(TESTS))
from fake_gpu import GIB, FakeArray, FakeCupy, FakeNvml, machine  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    CPU_FALLBACK.reset()
    monkeypatch.setattr(gpu, "_active_device", None)


def _fallback_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no GPU for this process" in r.getMessage()]


# ------------------------------------------------------------------ CPU fallback


def test_no_gpu_assigned_falls_back_to_cpu_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ray_alpcrun.pool.gpu")
    assert setup_device(gpu_ids=[]) is None
    assert setup_device(gpu_ids=[]) is None
    assert setup_device() is None  # outside Ray: nothing assigned
    (message,) = _fallback_records(caplog)
    assert "no GPU assigned" in message
    assert array_module() is np


def test_broken_cuda_falls_back_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ray_alpcrun.pool.gpu")
    broken = FakeCupy(machine(), [0], broken=True)
    assert setup_device(gpu_ids=["0"], cupy_module=broken, nvml=FakeNvml(machine())) is None
    (message,) = _fallback_records(caplog)
    assert "CUDA is not usable" in message and "no CUDA-capable device" in message


def test_missing_cupy_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cupy(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(gpu.importlib, "import_module", no_cupy)
    assert setup_device(gpu_ids=["0"]) is None
    assert CPU_FALLBACK.reason is not None and "CuPy cannot be imported" in CPU_FALLBACK.reason


# ------------------------------------------------------------------ CUDA <-> NVML mapping


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("by_uuid_works", [True, False])
def test_visible_device_maps_to_its_nvml_handle(truncate: bool, by_uuid_works: bool) -> None:
    gpus = machine()
    # CUDA_VISIBLE_DEVICES=1: CUDA's device 0 is the machine's second GPU.
    cp = FakeCupy(gpus, [1], truncate_uuid_at_nul=truncate)
    nvml = FakeNvml(gpus, by_uuid_works=by_uuid_works)
    device = setup_device(8 * GIB, gpu_ids=["1"], cupy_module=cp, nvml=nvml)
    assert device is not None
    assert device.nvml_index == 1
    # A UUID cut short at its zero byte is still matched (by PCI bus id or prefix).
    assert device.uuid == (gpus[1].nvml_uuid if not truncate else "5c3e9a")
    status = device.status()
    assert status["uuid"] == gpus[1].nvml_uuid
    assert status["memory_used_bytes"] == 3 * GIB and status["memory_total_bytes"] == 80 * GIB
    assert (status["utilization_pct"], status["temperature_c"]) == (93, 67)
    assert status["pool_limit_bytes"] == 8 * GIB == cp.pool.limit
    assert status["pool_used_bytes"] == 1234 and status["ray_gpu_ids"] == ["1"]
    assert array_module() is cp  # this process now computes on the GPU
    device.close()
    assert nvml.initialised == 0 and cp.pool.freed == 1


def test_all_gpus_visible_uses_rays_id_as_the_cuda_index() -> None:
    gpus = machine()  # e.g. RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: CUDA sees both
    cp = FakeCupy(gpus, [0, 1])
    device = setup_device(gpu_ids=["1"], cupy_module=cp, nvml=FakeNvml(gpus))
    assert device is not None and device.identity.cuda_index == 1 and device.nvml_index == 1
    # A thread that runs the handler (the direct path's socket thread) makes it current.
    cp.current = 0
    device.make_current()
    assert cp.current == 1


def test_mapping_without_a_match_is_an_error_and_nvml_loss_only_costs_readings() -> None:
    gpus = machine()
    stranger = CudaIdentity(0, bytes(range(1, 17)), "0000:01:00.0", "GPU", 1)
    with pytest.raises(LookupError, match="no unique NVML device"):
        find_nvml_device(FakeNvml(gpus), stranger)
    other_machine = FakeNvml([gpus[0]])
    device = setup_device(gpu_ids=["0"], cupy_module=FakeCupy(gpus, [1]), nvml=other_machine)
    assert device is not None and device.nvml_index is None
    status = device.status()  # CUDA's own memory figures still come through
    assert status["memory_total_bytes"] == 80 * GIB and status["temperature_c"] is None
    assert other_machine.initialised == 0


def test_fraction_caps_the_pool() -> None:
    cp = FakeCupy(machine(), [0])
    device = setup_device(
        gpu_ids=["0"], memory_fraction=0.25, cupy_module=cp, nvml=FakeNvml(machine())
    )
    assert device is not None and cp.pool.limit == 20 * GIB
    with pytest.raises(ConfigError):
        setup_device(gpu_ids=["0"], memory_fraction=1.5, cupy_module=cp)


def test_uuid_spellings() -> None:
    raw = bytes.fromhex("8a6f1c2e9b3d4e5fa1b2c3d4e5f60718")
    text = "GPU-8a6f1c2e-9b3d-4e5f-a1b2-c3d4e5f60718"
    assert nvml_uuid(raw) == text
    assert uuid_hex(raw) == uuid_hex(text) == uuid_hex(text.upper().encode()) == raw.hex()
    assert uuid_hex("MIG-" + text[4:]) == raw.hex()


def test_nvml_devices_reads_every_gpu_or_nothing() -> None:
    readings = nvml_devices(FakeNvml(machine()))
    assert [r["index"] for r in readings] == [0, 1]
    assert readings[1]["name"] == "Fake H100" and readings[1]["utilization_pct"] == 93

    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    assert nvml_devices(NoDriver(machine())) == []


# ------------------------------------------------------------------ moving data


@dataclass(frozen=True)
class Market:
    rate: float
    spots: Any


Pair = namedtuple("Pair", "a b")


def test_to_device_and_back_recurse_through_containers() -> None:
    cp = FakeCupy(machine(), [0])
    device = setup_device(gpu_ids=["0"], cupy_module=cp, nvml=FakeNvml(machine()))
    assert device is not None
    data = {"m": Market(0.01, np.arange(3.0)), "l": [np.ones(2), "tag"], "p": Pair(np.zeros(1), 5)}
    on = device.to_device(data)
    assert isinstance(on["m"].spots, FakeArray) and on["m"].rate == 0.01
    assert isinstance(on["l"][0], FakeArray) and on["l"][1] == "tag"
    assert isinstance(on["p"], Pair) and isinstance(on["p"].a, FakeArray) and on["p"].b == 5
    back = device.to_host({"x": on["l"][0], "p": on["p"]})
    assert isinstance(back["x"], np.ndarray) and isinstance(back["p"].a, np.ndarray)
    assert array_module(on["l"][0]) is np  # a FakeArray is not a real cupy.ndarray
    assert array_module(np.ones(1)) is np


# ------------------------------------------------------------------ requests


def test_gpu_request_checks() -> None:
    check_gpu_request(4, 0.0, 0.0)
    check_gpu_request(4, 0.5, 2.0)
    check_gpu_request(2, 2.0, 4.0)
    with pytest.raises(ConfigError, match=r"has no GPUs.*--gpus-per-actor 0"):
        check_gpu_request(1, 1.0, 0.0)
    with pytest.raises(ConfigError, match=r"3 actor\(s\) x 1 GPU = 3 GPU\(s\).*has 2 GPU"):
        check_gpu_request(3, 1.0, 2.0)
    # 0.4 each: two fit on a GPU (not 2.5), so five need three GPUs.
    with pytest.raises(ConfigError, match=r"2 actor\(s\) fit on each of the 2 GPU"):
        check_gpu_request(5, 0.4, 2.0)
    with pytest.raises(ConfigError, match="whole number"):
        check_gpu_request(1, 1.5, 4.0)
    with pytest.raises(ConfigError, match="negative"):
        check_gpu_request(1, -1.0, 4.0)


# ------------------------------------------------------------------ imports stay cheap


def test_importing_the_package_pulls_in_no_ray_cupy_or_nvml() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        import ray_alpcrun, ray_alpcrun.pool.gpu, ray_alpcrun.pool.nvml, ray_alpcrun.handler
        import ray_alpcrun.runtime
        print(json.dumps(sorted(m for m in ("ray", "cupy", "pynvml") if m in sys.modules)))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == []


# ------------------------------------------------------------------ fake GPUs in Ray

_RAY_SCRIPT = """
import json, os, sys
import ray

ray.init(num_cpus=3, num_gpus=2, include_dashboard=False, configure_logging=False,
         object_store_memory=80 * 1024 * 1024)

@ray.remote
class Probe:
    def run(self):
        sys.path.insert(0, {tests!r})
        from fake_gpu import FakeCupy, FakeNvml, machine
        from ray_alpcrun.pool.gpu import setup_device
        visible = [int(i) for i in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
        gpus = machine()
        device = setup_device(cupy_module=FakeCupy(gpus, visible), nvml=FakeNvml(gpus))
        status = device.status()
        return {{"visible": visible, "nvml_index": device.nvml_index, "uuid": status["uuid"],
                 "limit": status["pool_limit_bytes"], "ray_ids": status["ray_gpu_ids"]}}

# Actors hold their GPU while alive: two at once must get two different GPUs
# (two tasks could run one after the other on the same GPU).
holders = [Probe.options(num_gpus=1).remote() for _ in range(2)]
whole = ray.get([h.run.remote() for h in holders])
for h in holders:
    ray.kill(h)
half = ray.get(Probe.options(num_gpus=0.5).remote().run.remote())
print(json.dumps({{"whole": whole, "half": half}}))
ray.shutdown()
"""


def test_ray_assigned_fake_gpus_map_to_the_right_nvml_devices() -> None:
    """Ray sets CUDA_VISIBLE_DEVICES per worker; each maps to its own NVML device by UUID."""
    script = _RAY_SCRIPT.format(tests=str(TESTS))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    gpus = machine()
    seen = set()
    for r in out["whole"]:
        (index,) = r["visible"]
        assert r["ray_ids"] == [str(index)] and r["nvml_index"] == index
        assert r["uuid"] == gpus[index].nvml_uuid and r["limit"] is None
        seen.add(index)
    assert seen == {0, 1}  # two actors, two different GPUs
    assert out["half"]["limit"] == 40 * GIB  # half a GPU: half its memory


# ------------------------------------------------------------------ a real GPU


def _cuda_available() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs CuPy and a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_real_device_setup_and_readings() -> None:
    device = setup_device(gpu_ids=["0"])
    assert device is not None
    status = device.status()
    assert status["memory_total_bytes"] > 0 and status["name"]
    if device.nvml_index is not None:
        assert status["temperature_c"] is not None
        assert any(r["uuid"] == status["uuid"] for r in nvml_devices())
    x = device.to_device({"a": np.arange(4.0)})["a"]
    assert array_module(x) is device.xp
    np.testing.assert_array_equal(device.to_host(x * 2), np.arange(4.0) * 2)
    device.free()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("engine", ["xp", "cuda"])
def test_monte_carlo_on_the_gpu_agrees_with_numpy(engine: str) -> None:
    import cupy

    sys.path.insert(0, str(TESTS.parents[1]))
    from ray_alpcrun.examples.monte_carlo.client import build_book, make_tasks
    from ray_alpcrun.examples.monte_carlo.engine import price_tasks
    from ray_alpcrun.examples.monte_carlo.pricing import EUROPEAN, analytic_prices

    market, contracts = build_book(n_stocks=4, n_contracts=16, n_steps=12, seed=5)
    tasks = make_tasks(contracts, paths_per_task=200_000, n_tasks=2)
    on_gpu = price_tasks(cupy, market, tasks, engine=engine)
    on_cpu = price_tasks(np, market, tasks)
    bs = analytic_prices(market, contracts)
    eur = contracts["kind"] == EUROPEAN
    for g, c in zip(on_gpu, on_cpu, strict=True):
        diff = np.abs(g.prices - c.prices) / np.hypot(g.stderr, c.stderr)
        assert np.all(diff < 4.5), diff
        z = (g.prices[eur] - bs[eur]) / g.stderr[eur]
        assert np.all(np.abs(z) < 4.0), z
    # Same seed, same engine: the device is deterministic.
    again = price_tasks(cupy, market, tasks, engine=engine)
    np.testing.assert_allclose(again[0].prices, on_gpu[0].prices, rtol=1e-10)
