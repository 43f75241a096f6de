"""Device check for a single-GPU machine (issue 5), in under 5 minutes.

    python benchmarks/gpu_check.py                  # everything; exits 0 with SKIPPED without a GPU
    python benchmarks/gpu_check.py --require-gpu    # exit 2 when there is no usable GPU
    python benchmarks/gpu_check.py --cpu-only       # just the NumPy figure for this machine

Steps (each prints its figures; ``--json PATH`` also writes them):

1. NVML readings of every GPU;
2. ``pytest -m gpu`` (the device tests in tests/integration/test_gpu.py);
3. Monte Carlo paths/s on the GPU (CuPy: fused kernel and generic array engine);
4. the same book with NumPy on every CPU core (one process per core);
5. the example end to end: local services (devserver) -> bridge -> a GPU actor -> client;

and the verdict: GPU paths/s over all-core NumPy paths/s (the issue asks for >= 50x).
Every run prices the same book: 8 correlated stocks, 32 Europeans and 32 arithmetic
Asians with 52 averaging dates, so a path is the same work on either side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ray_alpcrun.examples.monte_carlo.client import build_book, make_tasks, summarise  # noqa: E402
from ray_alpcrun.examples.monte_carlo.engine import contract_steps, make_simulator, price_tasks  # noqa: E402
from ray_alpcrun.examples.monte_carlo.pricing import (  # noqa: E402
    MarketData,
    PricingTask,
    decode_market,
    decode_task,
    encode_market,
    encode_task,
)
from ray_alpcrun.pool.gpu import nvml_devices, setup_device  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 2
TARGET_SPEEDUP = 50.0
CPU_PATHS_PER_TASK = 8_000
GPU_TASKS_PER_BATCH = 8


def book() -> tuple[MarketData, Any]:
    return build_book(n_stocks=8, n_contracts=64, asian_fraction=0.5, n_steps=52, seed=0)


def probe_gpu() -> tuple[bool, str]:
    """(usable, description or the reason not)."""
    try:
        import cupy
    except Exception as exc:
        return False, f"CuPy cannot be imported ({exc})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return False, f"CUDA is not usable ({exc})"
    if count < 1:
        return False, "CUDA sees no device"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return True, f"{count} CUDA device(s); device 0: {props['name'].decode(errors='replace')}"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- NVML sampling


class NvmlSampler(threading.Thread):
    """Peak utilisation, temperature and memory of GPU 0 while a measurement runs."""

    def __init__(self, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period_s = period_s
        self.stop_event = threading.Event()
        self.peak: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            readings = nvml_devices()
            if not readings:
                return
            for key in ("utilization_pct", "temperature_c", "memory_used_bytes"):
                value = readings[0].get(key)
                if value is not None:
                    self.peak[key] = max(self.peak.get(key, value), value)

    def __enter__(self) -> NvmlSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join()


# ---------------------------------------------------------------- steps


def run_gpu_tests(timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests/integration/test_gpu.py"]  # fmt: skip
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {timeout_s:.0f} s"}
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(tail[-12:]))
    return {
        "ok": proc.returncode == 0,
        "summary": tail[-1] if tail else "",
        "seconds": time.perf_counter() - start,
    }


def gpu_throughput(engine: str, min_seconds: float) -> dict[str, Any]:
    """Paths/s of ``price_tasks`` on the GPU, for batches of 8 tasks of growing size."""
    import cupy

    market, contracts = book()
    device = setup_device(gpu_ids=["0"])
    if device is None:
        raise RuntimeError("setup_device found no GPU")
    on_device = device.to_device(market)
    sim = make_simulator(cupy, engine)
    # Warm-up: kernel compilation and memory pool growth stay out of the timing.
    price_tasks(cupy, on_device, make_tasks(contracts, 4096, 2), engine=sim)
    paths = 1 << 17
    while True:
        tasks = make_tasks(contracts, paths, GPU_TASKS_PER_BATCH, seed=100)
        with NvmlSampler() as sampler:
            start = time.perf_counter()
            results = price_tasks(cupy, on_device, tasks, engine=sim)
            elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or paths >= 1 << 24:
            break
        paths *= 2 if elapsed > min_seconds / 8 else 8
    total = paths * len(tasks)
    out = {
        "engine": sim.name,
        "paths": total,
        "seconds": elapsed,
        "paths_per_s": total / elapsed,
        "contract_steps_per_s": contract_steps(tasks) / elapsed,
        "nvml_peak": sampler.peak,
        "device": device.status(),
        "max_abs_z": _max_z(market, contracts, results),
    }
    device.free()
    return out


def _max_z(market: MarketData, contracts: Any, results: Any) -> float:
    figures = summarise(market, contracts, results, out=lambda line: None)
    return float(figures["max_abs_z"])


def _cpu_worker(job: tuple[bytes, bytes, float]) -> tuple[int, float]:
    """Price copies of one task (fresh seeds) until ``seconds`` have passed: (paths, seconds)."""
    market, template, seconds = decode_market(job[0]), decode_task(job[1]), job[2]
    paths = 0
    start = time.perf_counter()
    while True:
        task = PricingTask(template.seed + paths, template.paths, template.contracts)
        price_tasks(np, market, [task])
        paths += task.paths
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return paths, elapsed


def numpy_all_cores(seconds: float, workers: int | None = None) -> dict[str, Any]:
    """Paths/s with NumPy in one process per CPU core, all running at once for ``seconds``."""
    workers = workers or cpu_cores()
    market, contracts = book()
    shared = encode_market(market)
    tasks = make_tasks(contracts, CPU_PATHS_PER_TASK, workers, seed=1000)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # one core per process: no BLAS threads on top
    ctx = multiprocessing.get_context("spawn")  # no fork after CUDA was initialised
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        warm = encode_task(make_tasks(contracts, 256, 1)[0])
        list(pool.map(_cpu_worker, [(shared, warm, 0.0)] * workers))  # imports, page-in
        start = time.perf_counter()
        done = list(pool.map(_cpu_worker, [(shared, encode_task(t), seconds) for t in tasks]))
        wall = time.perf_counter() - start
    total = sum(p for p, _ in done)
    # Each process's own rate, summed: the CPU's best case (wall time adds the
    # stragglers' last task), so the GPU's speed-up is not flattered.
    rate = sum(p / s for p, s in done)
    per_path = contract_steps(tasks[:1]) / tasks[0].paths
    return {
        "workers": workers,
        "paths": total,
        "seconds": wall,
        "paths_per_s": rate,
        "paths_per_s_wall": total / wall,
        "paths_per_s_per_core": rate / workers,
        "contract_steps_per_s": rate * per_path,
    }


def end_to_end(gpus_per_actor: float, actors: int, n_tasks: int, paths: int) -> dict[str, Any]:
    """The example through local services (devserver), the bridge and GPU actors.

    LEAD: this uses ``start_bridge`` and ``BridgeHandle.status()`` as they are today;
    adjust here if the bridge API changes.
    """
    import ray

    from ray_alpcrun.bridge.launch import start_bridge
    from ray_alpcrun.config import BridgeConfig, PoolConfig
    from ray_alpcrun.devserver import LocalServices
    from ray_alpcrun.examples.monte_carlo.client import HANDLER, run_on_grid

    market, contracts = book()
    ray.init(configure_logging=False, include_dashboard=False, log_to_driver=False)
    try:
        with LocalServices() as services:
            config = BridgeConfig(
                services=services.service_config(),
                handler=HANDLER,
                pool=PoolConfig(num_actors=actors, gpus_per_actor=gpus_per_actor),
                log_level="warning",
            )
            bridge = start_bridge(config)
            try:
                bridge.wait_ready(timeout_s=180.0)
                grid: dict[str, Any] = {
                    "queue": services.queue_address,
                    "central_cache": services.central_cache_address,
                    "api_key": services.api_key,
                    "progress": False,
                }
                # Warm-up: the actors compile their kernels on their first batch.
                run_on_grid(market, make_tasks(contracts, 4096, actors), **grid, batch_size=1)
                tasks = make_tasks(contracts, paths, n_tasks, seed=500)
                with NvmlSampler() as sampler:
                    results, elapsed = run_on_grid(market, tasks, **grid, batch_size=2)
                status = ray.get(bridge.status(), timeout=30)
            finally:
                ray.get(bridge.stop(drain=True), timeout=60)
                ray.get(bridge.run_ref, timeout=60)
    finally:
        ray.shutdown()
    figures = summarise(market, contracts, results, elapsed, max_rows=4)
    return {
        "actors": actors,
        "gpus_per_actor": gpus_per_actor,
        "tasks": n_tasks,
        "paths": figures["paths"],
        "seconds": elapsed,
        "paths_per_s": figures["paths_per_s"],
        "max_abs_z": figures["max_abs_z"],
        "within_3_se": figures["within_3_se"],
        "nvml_peak": sampler.peak,
        "bridge_status": _devices_in(status),
    }


def _devices_in(status: Any) -> Any:
    """The device readings inside the bridge's status (whatever its exact shape)."""
    found: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("device"), dict):
                found.append(x["device"])
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(status)
    return found or status


# ---------------------------------------------------------------- main


def _line(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-only", action="store_true", help="only the NumPy all-cores figure")
    p.add_argument("--require-gpu", action="store_true", help=f"exit {EXIT_NO_GPU} without a GPU")
    p.add_argument("--cpu-seconds", type=float, default=20.0, help="length of the NumPy run")
    p.add_argument("--gpu-seconds", type=float, default=3.0, help="minimum length of a GPU run")
    p.add_argument("--cpu-workers", type=int, default=None, help="default: every core")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--e2e-tasks", type=int, default=16)
    p.add_argument("--e2e-paths", type=int, default=1 << 20)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"cpu_cores": cpu_cores()}
    started = time.perf_counter()

    _line("machine")
    usable, detail = probe_gpu()
    report["gpu"] = detail
    print(f"{cpu_cores()} CPU core(s); GPU: {detail}")
    report["nvml"] = nvml_devices()
    for r in report["nvml"]:
        print(f"  NVML {r['index']}: {r['name']} {r['uuid']} {_gib(r['memory_used_bytes'])}/"
              f"{_gib(r['memory_total_bytes'])} used, {r['utilization_pct']}% busy, "
              f"{r['temperature_c']} C")  # fmt: skip
    failed = False
    if not usable and not args.cpu_only:
        print(f"SKIPPED: no usable CUDA GPU here ({detail}); the GPU checks need one.")
        if args.require_gpu:
            return _finish(report, args.json, EXIT_NO_GPU)

    if usable and not args.cpu_only and not args.skip_tests:
        _line("pytest -m gpu")
        report["gpu_tests"] = run_gpu_tests(timeout_s=150.0)
        failed |= not report["gpu_tests"]["ok"]

    if usable and not args.cpu_only:
        for engine in ("cuda", "xp"):
            _line(f"GPU throughput, {engine} engine")
            try:
                r = gpu_throughput(engine, args.gpu_seconds)
            except Exception as exc:  # report and carry on: the other figures still count
                print(f"failed: {type(exc).__name__}: {exc}")
                report[f"gpu_{engine}"] = {"error": repr(exc)}
                failed = True
                continue
            report[f"gpu_{engine}"] = r
            print(f"{r['engine']}: {r['paths']:,} paths in {r['seconds']:.2f} s = "
                  f"{r['paths_per_s']:,.0f} paths/s ({r['contract_steps_per_s'] / 1e9:.2f} G "
                  f"contract-steps/s); max |z| vs Black-Scholes {r['max_abs_z']:.2f}; "
                  f"NVML peak {r['nvml_peak']}")  # fmt: skip

    _line("NumPy on every CPU core")
    cpu = numpy_all_cores(args.cpu_seconds, args.cpu_workers)
    report["numpy_all_cores"] = cpu
    print(f"{cpu['workers']} process(es): {cpu['paths']:,} paths in {cpu['seconds']:.2f} s = "
          f"{cpu['paths_per_s']:,.0f} paths/s ({cpu['paths_per_s_per_core']:,.0f} per core, "
          f"{cpu['contract_steps_per_s'] / 1e6:.1f} M contract-steps/s)")  # fmt: skip

    if usable and not args.cpu_only and not args.skip_e2e:
        _line("end to end: devserver -> bridge -> GPU actor -> client")
        try:
            report["e2e"] = end_to_end(1.0, 1, args.e2e_tasks, args.e2e_paths)
            e = report["e2e"]
            print(f"{e['paths']:,.0f} paths in {e['seconds']:.2f} s = {e['paths_per_s']:,.0f} "
                  f"paths/s; Europeans within 3 SE: {e['within_3_se']:.0%}; NVML peak "
                  f"{e['nvml_peak']}; actors' devices {e['bridge_status']}")  # fmt: skip
            failed |= not e["within_3_se"] >= 0.9
        except Exception as exc:
            print(f"failed: {type(exc).__name__}: {exc}")
            report["e2e"] = {"error": repr(exc)}
            failed = True

    _line("verdict")
    gpu_rates = [report[k].get("paths_per_s") for k in ("gpu_cuda", "gpu_xp") if k in report]
    best = max((r for r in gpu_rates if r is not None), default=None)
    if best is not None:
        ratio = best / cpu["paths_per_s"]
        report["speedup"] = ratio
        ok = ratio >= TARGET_SPEEDUP
        failed |= not ok
        print(f"GPU {best:,.0f} paths/s vs NumPy on {cpu['workers']} core(s) "
              f"{cpu['paths_per_s']:,.0f} paths/s: {ratio:.1f}x "
              f"({'PASS' if ok else 'FAIL'}: target {TARGET_SPEEDUP:.0f}x)")  # fmt: skip
    else:
        print(
            f"no GPU figure; NumPy on {cpu['workers']} core(s): {cpu['paths_per_s']:,.0f} paths/s"
        )
    report["seconds"] = time.perf_counter() - started
    print(f"gpu_check took {report['seconds']:.0f} s")
    return _finish(report, args.json, EXIT_FAILED if failed else EXIT_OK)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _finish(report: dict[str, Any], path: Path | None, code: int) -> int:
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
