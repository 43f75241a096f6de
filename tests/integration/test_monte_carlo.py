"""The Monte Carlo example: accuracy against closed forms, batching, the handler life cycle,
and the fused CUDA kernel's arithmetic (compiled as C++ and run on the CPU)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ray_alpcrun.examples.monte_carlo.client import build_book, combine, make_tasks, summarise
from ray_alpcrun.examples.monte_carlo.cuda_kernel import (
    KERNEL_SOURCE,
    CudaSimulator,
    compile_options,
)
from ray_alpcrun.examples.monte_carlo.engine import price_tasks
from ray_alpcrun.examples.monte_carlo.handler import MonteCarloHandler
from ray_alpcrun.examples.monte_carlo.pricing import (
    ASIAN,
    EUROPEAN,
    FormatError,
    MarketData,
    PricingTask,
    analytic_prices,
    decode_market,
    decode_result,
    decode_task,
    encode_market,
    encode_result,
    encode_task,
    geometric_asian,
    make_contracts,
)
from ray_alpcrun.runtime import HandlerRuntime, SharedSpec


@pytest.fixture(scope="module")
def market() -> MarketData:
    corr = [[1.0, 0.6, 0.3], [0.6, 1.0, 0.4], [0.3, 0.4, 1.0]]
    return MarketData.create(0.03, [100.0, 50.0, 200.0], [0.2, 0.35, 0.25], [0.01, 0.0, 0.02], corr)


def _strip(market: MarketData) -> np.ndarray[Any, Any]:
    """Europeans and Asians on every stock; contract 8 is contract 0 as a one-date Asian."""
    return make_contracts(
        underlying=[0, 1, 2, 0, 1, 2, 0, 1, 0],
        kind=[EUROPEAN] * 3 + [ASIAN] * 3 + [EUROPEAN, EUROPEAN, ASIAN],
        call=[1, 0, 1, 1, 0, 1, 1, 1, 1],
        strike=[100.0, 55.0, 190.0, 100.0, 55.0, 190.0, 100.0, 45.0, 100.0],
        maturity=[1.0, 0.5, 2.0, 1.0, 0.5, 2.0, 1.0, 0.25, 1.0],
        n_steps=[1, 1, 1, 12, 6, 24, 1, 1, 1],
    )


def test_formats_round_trip(market: MarketData) -> None:
    back = decode_market(encode_market(market))
    assert back.rate == market.rate
    np.testing.assert_array_equal(back.corr, market.corr)
    task = PricingTask(seed=7, paths=1000, contracts=_strip(market))
    again = decode_task(encode_task(task))
    assert (again.seed, again.paths) == (7, 1000)
    np.testing.assert_array_equal(again.contracts, task.contracts)
    (result,) = price_tasks(np, market, [PricingTask(seed=1, paths=100, contracts=task.contracts)])
    r2 = decode_result(encode_result(result))
    np.testing.assert_array_equal(r2.prices, result.prices)
    assert (r2.paths, r2.book_value) == (100, result.book_value)


def test_bad_inputs_are_rejected(market: MarketData) -> None:
    with pytest.raises(FormatError, match="positive definite"):
        MarketData.create(0.0, [1.0, 1.0], [0.2, 0.2], [0, 0], [[1.0, 1.2], [1.2, 1.0]])
    with pytest.raises(FormatError):
        decode_market(b"MCM1" + b"\0" * 3)
    with pytest.raises(FormatError, match="stock 5"):
        PricingTask(1, 100, make_contracts(5, EUROPEAN, 1, 100.0, 1.0)).validate(market.n)
    with pytest.raises(FormatError, match="Asian"):
        PricingTask(1, 100, make_contracts(0, ASIAN, 1, 100.0, 1.0, 0)).validate(market.n)


def test_europeans_within_three_standard_errors_of_black_scholes(market: MarketData) -> None:
    contracts = _strip(market)
    (r,) = price_tasks(np, market, [PricingTask(seed=2024, paths=100_000, contracts=contracts)])
    bs = analytic_prices(market, contracts)
    eur = contracts["kind"] == EUROPEAN
    z = (r.prices[eur] - bs[eur]) / r.stderr[eur]
    assert np.all(np.abs(z) < 3.0), z
    assert np.all(r.stderr[eur] < 0.01 * bs[eur] + 0.01)  # the estimate is informative
    # A one-date Asian is the European, path for path.
    assert r.prices[8] == r.prices[0] and r.stderr[8] == r.stderr[0]


def test_asians_lie_between_geometric_and_european(market: MarketData) -> None:
    contracts = _strip(market)
    (r,) = price_tasks(np, market, [PricingTask(seed=99, paths=100_000, contracts=contracts)])
    bs = analytic_prices(market, contracts)
    for asian, european in ((3, 0), (5, 2)):  # calls: averaging cuts the volatility
        c = contracts[asian]
        u = int(c["underlying"])
        geo = geometric_asian(
            float(market.spots[u]), float(c["strike"]), float(c["maturity"]), market.rate,
            float(market.dividends[u]), float(market.vols[u]), True, int(c["n_steps"]),
        )  # fmt: skip
        assert r.prices[asian] < bs[european]
        assert r.prices[asian] > geo - 3 * r.stderr[asian]  # AM >= GM on every path
    # Correlation matters for the book: its error is not that of independent contracts.
    assert r.book_stderr > float(np.sqrt(np.sum(r.stderr**2)))


def test_batch_prices_each_task_as_if_alone(market: MarketData) -> None:
    contracts = _strip(market)
    tasks = [
        PricingTask(seed=1, paths=5000, contracts=contracts),
        PricingTask(seed=2, paths=3001, contracts=contracts[:4]),  # ends inside a chunk
        PricingTask(seed=3, paths=4096, contracts=contracts[5:]),
    ]
    together = price_tasks(np, market, tasks, chunk_paths=1024)
    for task, joint in zip(tasks, together, strict=True):
        (alone,) = price_tasks(np, market, [task], chunk_paths=1024)
        np.testing.assert_allclose(joint.prices, alone.prices, rtol=1e-12)
        np.testing.assert_allclose(joint.stderr, alone.stderr, rtol=1e-9)
        assert joint.book_value == pytest.approx(alone.book_value, rel=1e-12)
        assert joint.paths == task.paths
    # Small memory budgets split the batch into groups without changing anything.
    split = price_tasks(np, market, tasks, chunk_paths=1024, max_chunk_bytes=1)
    for a, b in zip(split, together, strict=True):
        np.testing.assert_allclose(a.prices, b.prices, rtol=1e-12)


def test_handler_batch_equals_task_by_task_and_decodes_shared_once(market: MarketData) -> None:
    book_market, contracts = build_book(n_stocks=4, n_contracts=12, n_steps=8, seed=3)
    tasks = make_tasks(contracts, paths_per_task=2000, n_tasks=5, contracts_per_task=6)
    payloads = [encode_task(t) for t in tasks]
    payloads.insert(2, b"not a task")
    shared = encode_market(book_market)
    fetches = []

    def fetch() -> bytes:
        fetches.append(1)
        return shared

    handler = MonteCarloHandler(chunk_paths=512)
    runtime = HandlerRuntime(handler, xp=np)
    batch = runtime.run("s1", payloads, SharedSpec(1, fetch))
    again = runtime.run("s1", payloads[:1], SharedSpec(1, fetch))  # same level: no new decode
    assert runtime.shared_decodes == 1 and len(fetches) == 1
    assert batch[2][0] is None and "FormatError" in (batch[2][1] or "")
    single = HandlerRuntime(MonteCarloHandler(chunk_paths=512), xp=np)
    for i, payload in enumerate(payloads):
        if i == 2:
            continue
        ((alone, error),) = single.run("s2", [payload], SharedSpec(1, lambda: shared))
        assert error is None and batch[i][1] is None
        a, b = decode_result(alone or b""), decode_result(batch[i][0] or b"")
        np.testing.assert_allclose(b.prices, a.prices, rtol=1e-12)
    np.testing.assert_allclose(
        decode_result(again[0][0] or b"").prices,
        decode_result(batch[0][0] or b"").prices,
        rtol=1e-12,
    )
    results = [decode_result(o[0]) for o in batch if o[0] is not None]
    lines: list[str] = []
    figures = summarise(book_market, contracts, results, elapsed_s=1.0, out=lines.append)
    assert figures["contracts"] == 12 and figures["paths"] == 10_000
    assert figures["within_3_se"] >= 0.8
    assert combine(results).paths.tolist() == [6000] * 6 + [4000] * 6


def test_handler_needs_market_data() -> None:
    runtime = HandlerRuntime(MonteCarloHandler(), xp=np)
    from ray_alpcrun.errors import SessionSetupError

    with pytest.raises(SessionSetupError, match="market data"):
        runtime.run("s", [b"x"])


# ------------------------------------------------------------------ the CUDA kernel, on the CPU

_SHIM = r"""
#include <cmath>
struct mc_dim3 { unsigned int x; };
static mc_dim3 blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
static inline void sincospi(double x, double* s, double* c) {
    *s = std::sin(M_PI * x); *c = std::cos(M_PI * x);
}
using std::exp; using std::log; using std::sqrt;
"""

# Launches the kernel the way CUDA would: every (block, thread) of the grid.
_DRIVER = r"""
extern "C" void mc_philox_kat(unsigned int* c, unsigned int k0, unsigned int k1) {
    mc_philox(c, k0, k1);
}
extern "C" void mc_launch(
    unsigned int grid, unsigned int block,
    const unsigned long long* seeds, const long long* rows, long long start, int r, int n_tasks,
    int n, const double* chol, const long long* task_first, const long long* task_count,
    const long long* task_steps, const long long* spec_under, const long long* spec_steps,
    const double* spec_drift, const double* spec_scale, const double* spec_log_spot, double* out)
{
    blockDim.x = block;
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            alpcrun_mc_paths(seeds, rows, start, r, n_tasks, n, chol, task_first, task_count,
                             task_steps, spec_under, spec_steps, spec_drift, spec_scale,
                             spec_log_spot, out);
        }
    }
}
"""

# The kernel's parameters after (grid, block): what CudaSimulator must pass, in order.
_PARAMS: list[Any] = [
    np.uint64, np.int64, np.int64, np.int32, np.int32, np.int32, np.float64,
    np.int64, np.int64, np.int64, np.int64, np.int64, np.float64, np.float64, np.float64,
    np.float64,
]  # fmt: skip
_SCALARS = {2: ctypes.c_longlong, 3: ctypes.c_int, 4: ctypes.c_int, 5: ctypes.c_int}


class _Compiler:
    """Builds the kernel source as a C++ shared library, once per set of -D options."""

    def __init__(self, cxx: str, workdir: Path) -> None:
        self.cxx, self.workdir = cxx, workdir
        self.libs: dict[tuple[str, ...], ctypes.CDLL] = {}

    def __call__(self, options: tuple[str, ...]) -> ctypes.CDLL:
        if options not in self.libs:
            d = self.workdir / f"k{len(self.libs)}"
            d.mkdir()
            (d / "kernel.cpp").write_text(_SHIM + KERNEL_SOURCE + _DRIVER)
            cmd = [self.cxx, "-O2", "-shared", "-fPIC", *options, str(d / "kernel.cpp")]
            subprocess.run([*cmd, "-o", str(d / "kernel.so")], check=True, capture_output=True)
            self.libs[options] = ctypes.CDLL(str(d / "kernel.so"))
        return self.libs[options]


class _FakeRawKernel:
    """``cupy.RawKernel`` stand-in: checks the launch arguments, runs the C++ build."""

    def __init__(self, compiler: _Compiler, code: str, name: str, options: tuple[str, ...]) -> None:
        assert code == KERNEL_SOURCE and name == "alpcrun_mc_paths"
        self.compiler, self.options = compiler, tuple(options)
        self.launches = 0

    def compile(self) -> None:
        self.compiler(self.options)

    def __call__(self, grid: tuple[int], block: tuple[int], args: tuple[Any, ...]) -> None:
        assert len(args) == len(_PARAMS)
        converted: list[Any] = []
        for i, (arg, want) in enumerate(zip(args, _PARAMS, strict=True)):
            if i in _SCALARS:  # scalars must be NumPy scalars of the C type
                assert type(arg) is want, (i, type(arg))
                converted.append(_SCALARS[i](int(arg)))
            else:
                assert isinstance(arg, np.ndarray) and arg.dtype == want, (i, arg.dtype)
                assert arg.flags.c_contiguous, i
                converted.append(arg.ctypes.data_as(ctypes.c_void_p))
        lib = self.compiler(self.options)
        lib.mc_launch(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *converted)
        self.launches += 1


@pytest.fixture(scope="module")
def fake_cupy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Just enough of CuPy, on NumPy, for CudaSimulator; kernels run as compiled C++."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to run the CUDA kernel's source on the CPU")
    compiler = _Compiler(cxx, tmp_path_factory.mktemp("mc_kernel"))
    kernels: list[_FakeRawKernel] = []

    def raw_kernel(code: str, name: str, options: tuple[str, ...] = ()) -> _FakeRawKernel:
        kernels.append(_FakeRawKernel(compiler, code, name, options))
        return kernels[-1]

    return SimpleNamespace(
        RawKernel=raw_kernel, kernels=kernels, compiler=compiler,
        int64=np.int64, uint64=np.uint64, float64=np.float64,
        asarray=np.asarray, ascontiguousarray=np.ascontiguousarray, empty=np.empty,
    )  # fmt: skip


def test_kernel_philox_matches_random123_known_answers(fake_cupy: Any) -> None:
    lib = fake_cupy.compiler(compile_options(8, 8))
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, (k0, k1), expected in vectors:
        c = (ctypes.c_uint * 4)(*counter)
        lib.mc_philox_kat(c, ctypes.c_uint(k0), ctypes.c_uint(k1))
        assert tuple(c) == expected


def test_kernel_prices_match_black_scholes_and_ignore_chunking(
    fake_cupy: Any, market: MarketData
) -> None:
    contracts = _strip(market)
    tasks = [
        PricingTask(seed=11, paths=60_000, contracts=contracts),
        PricingTask(seed=12, paths=30_000, contracts=contracts[3:]),
    ]
    sim = CudaSimulator(fake_cupy)
    sim.compile()
    big = price_tasks(np, market, tasks, chunk_paths=60_000, engine=sim)
    assert fake_cupy.kernels[-1].launches == 1  # the whole batch in one launch
    bs = analytic_prices(market, contracts)
    eur = contracts["kind"] == EUROPEAN
    z = (big[0].prices[eur] - bs[eur]) / big[0].stderr[eur]
    assert np.all(np.abs(z) < 3.0), z
    assert big[0].prices[8] == big[0].prices[0]
    # The kernel's random numbers depend on (seed, path, step) only: chunking and
    # batching change nothing but the order of the final sums.
    small = price_tasks(np, market, tasks, chunk_paths=7_000, engine=sim)
    (alone,) = price_tasks(np, market, tasks[1:], chunk_paths=4096, engine=sim)
    np.testing.assert_allclose(small[0].prices, big[0].prices, rtol=1e-10)
    np.testing.assert_allclose(alone.prices, big[1].prices, rtol=1e-10)
    # Independent streams from the NumPy path agree within the combined error.
    (ref,) = price_tasks(np, market, tasks[:1])
    diff = np.abs(ref.prices - big[0].prices) / np.hypot(ref.stderr, big[0].stderr)
    assert np.all(diff < 4.0), diff


def test_kernel_compiles_for_the_gpu_with_nvcc(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src = tmp_path / "kernel.cu"
    src.write_text(KERNEL_SOURCE)
    cmd = [nvcc, "-ptx", "-arch=sm_80", "-DMC_MAX_SPECS=16", str(src), "-o", str(tmp_path / "k")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
