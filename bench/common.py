"""Shared helpers for the benchmarks: timing, machine description, memory bandwidth,
random GGML weight matrices."""

from __future__ import annotations

import os
import platform
import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def median_time(fn, repeat: int = 15, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    stream_sum(np.ones(64, np.float32))         # starts the threading layer
    return (f"{cpu}, {os.cpu_count()} logical CPUs, numba {numba.__version__}, "
            f"{numba.config.NUMBA_NUM_THREADS} threads ({numba.threading_layer()})")


@numba.njit(parallel=True, fastmath=True, cache=True)
def stream_sum(a):
    n = a.size
    nchunk = 64
    part = np.zeros(nchunk)
    step = (n + nchunk - 1) // nchunk
    for c in numba.prange(nchunk):
        s = np.float32(0.0)
        b = a[c * step:min(n, (c + 1) * step)]
        for i in range(b.size):
            s += b[i]
        part[c] = s
    return part.sum()


def memory_bandwidth(gib: float = 1.0) -> float:
    """Measured streaming read bandwidth, GB/s (a parallel sum over ``gib`` GiB)."""
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    stream_sum(a)
    t = median_time(lambda: stream_sum(a), repeat=7)
    return a.nbytes / t / 1e9


def random_quant_matrix(qtype: QT, n_rows: int, row_len: int, rng) -> np.ndarray:
    """Random but valid GGML rows uint8 [n_rows, bytes_per_row]: random quant bits with
    moderate f16 scales written into every scale field."""
    block, size = GGML_QUANT_SIZES[qtype]
    nb = row_len // block
    raw = rng.integers(0, 256, (n_rows, nb, size), dtype=np.uint8)
    scale_offsets = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2],
                     QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
                     QT.Q6_K: [208], QT.IQ4_NL: [0], QT.IQ4_XS: [0]}[qtype]
    scales = rng.uniform(0.001, 0.01, (n_rows, nb, len(scale_offsets))).astype(np.float16)
    for i, off in enumerate(scale_offsets):
        raw[:, :, off:off + 2] = scales[:, :, i:i + 1].view(np.uint8)
    return raw.reshape(n_rows, nb * size)
