"""A fused CUDA kernel for the path simulation (CuPy only).

The generic ``xp`` engine streams every intermediate through GPU memory (draw,
correlate, gather, step: a few bytes moved per flop), so it is memory bound.
This kernel gives each (task, path) one thread that keeps its state in
registers and local memory and makes its own random numbers with the
counter-based Philox4x32-10 generator: the normals of path ``p``, step ``k``
of a task depend only on the task's seed, ``p`` and ``k``, never on the chunk
size, the batch or the launch shape.

:data:`KERNEL_SOURCE` avoids CUDA-only library headers so that it also
compiles as plain C++ (the test suite checks its arithmetic on the CPU that
way; ``nvcc`` or NVRTC compile it for the GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KERNEL_NAME = "alpcrun_mc_paths"
THREADS_PER_BLOCK = 128
# Per-thread state lives in local arrays of these sizes; beyond them the
# generic engine takes the group (local memory would outgrow the device).
MAX_KERNEL_SPECS = 256
MAX_KERNEL_STOCKS = 64

KERNEL_SOURCE = r"""
#ifndef MC_MAX_SPECS
#define MC_MAX_SPECS 8
#endif
#ifndef MC_MAX_STOCKS
#define MC_MAX_STOCKS 8
#endif

// Philox4x32-10 (Salmon et al., SC'11), as in Random123 and cuRAND.
__device__ inline void mc_philox(unsigned int c[4], unsigned int k0, unsigned int k1) {
    for (int round = 0; round < 10; ++round) {
        unsigned long long p0 = (unsigned long long)0xD2511F53u * c[0];
        unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c[2];
        unsigned int hi0 = (unsigned int)(p0 >> 32), lo0 = (unsigned int)p0;
        unsigned int hi1 = (unsigned int)(p1 >> 32), lo1 = (unsigned int)p1;
        c[0] = hi1 ^ c[1] ^ k0;
        c[1] = lo1;
        c[2] = hi0 ^ c[3] ^ k1;
        c[3] = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

// A uniform in (0, 1): never 0, so log() is finite.
__device__ inline double mc_uniform(unsigned int x) {
    return ((double)x + 0.5) * 2.3283064365386962890625e-10;
}

// Four standard normals from one Philox block (Box-Muller on two pairs).
__device__ inline void mc_normals4(unsigned int c[4], double* z) {
    for (int h = 0; h < 2; ++h) {
        double r = sqrt(-2.0 * log(mc_uniform(c[2 * h])));
        double s, co;
        sincospi(2.0 * mc_uniform(c[2 * h + 1]), &s, &co);
        z[2 * h] = r * co;
        z[2 * h + 1] = r * s;
    }
}

// The counter of (path, step, block): the key is the task's seed.
__device__ inline void mc_block(unsigned long long path, int step, int block,
                                unsigned int k0, unsigned int k1, double* z) {
    unsigned int c[4];
    c[0] = (unsigned int)path;
    c[1] = (unsigned int)(path >> 32);
    c[2] = (unsigned int)step;
    c[3] = (unsigned int)block;
    mc_philox(c, k0, k1);
    mc_normals4(c, z);
}

// One thread per (task, path). out is (specs, r): each spec's average of the
// stock price over its dates (a European is a one-date average: the terminal price).
extern "C" __global__ void alpcrun_mc_paths(
    const unsigned long long* __restrict__ seeds,
    const long long* __restrict__ rows,
    long long start, int r, int n_tasks, int n,
    const double* __restrict__ chol,
    const long long* __restrict__ task_first,
    const long long* __restrict__ task_count,
    const long long* __restrict__ task_steps,
    const long long* __restrict__ spec_under,
    const long long* __restrict__ spec_steps,
    const double* __restrict__ spec_drift,
    const double* __restrict__ spec_scale,
    const double* __restrict__ spec_log_spot,
    double* __restrict__ out)
{
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= (long long)r * n_tasks) return;
    int t = (int)(tid / r);
    int p = (int)(tid % r);
    int first = (int)task_first[t];
    int count = (int)task_count[t];
    if (p >= rows[t]) {
        for (int i = 0; i < count; ++i) out[(long long)(first + i) * r + p] = 0.0;
        return;
    }
    unsigned long long path = (unsigned long long)(start + p);
    unsigned int k0 = (unsigned int)seeds[t];
    unsigned int k1 = (unsigned int)(seeds[t] >> 32);
    double logs[MC_MAX_SPECS], acc[MC_MAX_SPECS];
    double z[MC_MAX_STOCKS], x[MC_MAX_STOCKS];
    for (int i = 0; i < count; ++i) {
        logs[i] = spec_log_spot[first + i];
        acc[i] = 0.0;
    }
    int steps = (int)task_steps[t];
    for (int k = 0; k < steps; ++k) {
        for (int j = 0; j < n; j += 4) mc_block(path, k, j >> 2, k0, k1, z + j);
        // Correlate: x = L z with L the lower Cholesky factor of the correlation.
        for (int a = 0; a < n; ++a) {
            double s = 0.0;
            for (int b = 0; b <= a; ++b) s += chol[a * n + b] * z[b];
            x[a] = s;
        }
        for (int i = 0; i < count; ++i) {
            int sp = first + i;
            if (k < spec_steps[sp]) {
                logs[i] += spec_drift[sp] + spec_scale[sp] * x[spec_under[sp]];
                acc[i] += exp(logs[i]);
            }
        }
    }
    for (int i = 0; i < count; ++i) {
        out[(long long)(first + i) * r + p] = acc[i] / (double)spec_steps[first + i];
    }
}
"""


def compile_options(max_specs: int, n_stocks: int) -> tuple[str, ...]:
    """Array sizes baked into the kernel (rounded up so few variants get compiled)."""
    specs = 8
    while specs < max_specs:
        specs *= 2
    stocks = max(4, (n_stocks + 3) // 4 * 4)  # normals come four at a time
    return (f"-DMC_MAX_SPECS={specs}", f"-DMC_MAX_STOCKS={stocks}")


class CudaSimulator:
    """Simulates the specs' statistics with :data:`KERNEL_SOURCE` through ``cupy.RawKernel``."""

    name = "cuda"

    def __init__(self, cp: Any, fallback: Callable[[Any], Any] | None = None) -> None:
        self.cp = cp
        # Builds the generic simulator for tasks too large for the kernel (the
        # engine passes its XpSimulator; this module does not import the engine).
        self._make_fallback = fallback
        self._kernels: dict[tuple[str, ...], Any] = {}
        self._args: tuple[Any, ...] = ()
        self._kernel: Any = None
        self._chol: Any = None
        self._seeds: Any = None
        self._fallback: Any = None

    def _kernel_for(self, options: tuple[str, ...]) -> Any:
        kernel = self._kernels.get(options)
        if kernel is None:
            kernel = self.cp.RawKernel(KERNEL_SOURCE, KERNEL_NAME, options=options)
            self._kernels[options] = kernel
        return kernel

    def compile(self, max_specs: int = 8, n_stocks: int = 8) -> None:
        """Compile now (NVRTC), so a missing toolchain shows up before any task runs."""
        kernel = self._kernel_for(compile_options(max_specs, n_stocks))
        compile_now = getattr(kernel, "compile", None)
        if callable(compile_now):
            compile_now()
        else:  # older CuPy compiles when asked for the kernel's attributes
            _ = kernel.attributes

    def start(self, g: Any, chol: Any) -> None:
        cp = self.cp
        self._fallback = None
        if int(g.task_count.max()) > MAX_KERNEL_SPECS or g.n_stocks > MAX_KERNEL_STOCKS:
            if self._make_fallback is None:
                raise ValueError("task too large for the fused kernel, and no fallback given")
            log.info("task too large for the fused kernel; using the generic CuPy path")
            self._fallback = self._make_fallback(cp)
            self._fallback.start(g, chol)
            return
        self._kernel = self._kernel_for(compile_options(int(g.task_count.max()), g.n_stocks))
        self._chol = cp.ascontiguousarray(cp.asarray(chol, dtype=cp.float64))
        i64 = cp.int64
        self._seeds = cp.asarray(g.seeds, dtype=cp.uint64)
        self._args = (
            cp.asarray(g.task_first, dtype=i64),
            cp.asarray(g.task_count, dtype=i64),
            cp.asarray(g.task_steps, dtype=i64),
            cp.asarray(g.spec_under, dtype=i64),
            cp.asarray(g.spec_steps, dtype=i64),
            cp.ascontiguousarray(g.spec_drift, dtype=cp.float64),
            cp.ascontiguousarray(g.spec_scale, dtype=cp.float64),
            cp.ascontiguousarray(g.spec_log_spot, dtype=cp.float64),
        )

    def simulate(self, g: Any, start: int, rows: Any, r: int) -> Any:
        """The specs' statistics for paths ``start .. start + r``: shape ``(r, specs)``."""
        if self._fallback is not None:
            return self._fallback.simulate(g, start, rows, r)
        cp = self.cp
        n_tasks = len(g.tasks)
        n_specs = int(g.spec_steps.shape[0])
        out = cp.empty((n_specs, r), dtype=cp.float64)
        threads = r * n_tasks
        blocks = (threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
        self._kernel(
            (blocks,),
            (THREADS_PER_BLOCK,),
            (
                self._seeds,
                cp.asarray(np.asarray(rows, dtype=np.int64)),
                np.int64(start),
                np.int32(r),
                np.int32(n_tasks),
                np.int32(g.n_stocks),
                self._chol,
                *self._args,
                out,
            ),
        )
        return out.T
