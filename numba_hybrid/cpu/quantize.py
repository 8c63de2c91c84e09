"""Activation rounding for ``precision="fast"``: the Numba twin of
:func:`numba_hybrid.quants.round_activations` (same values, bit for bit).

Compiled without fast-math: rounding must follow IEEE exactly.
Legend: T tokens, K features.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..quants import ACT_BF16, ACT_F16, ACT_NONE, ACT_Q8_0
from .jit import PARALLEL, serial

strict = numba.njit(parallel=PARALLEL, fastmath=False, cache=True, nogil=True)
strict_helper = numba.njit(fastmath=False, cache=True, nogil=True, inline="always")


@strict_helper
def f16_round(v):
    """float32 -> nearest float16 value (ties to even), as float32."""
    a = abs(np.float64(v))
    if a == 0.0 or not math.isfinite(a):
        return v
    if a >= 65520.0:
        return np.float32(math.copysign(math.inf, v))
    e = math.frexp(a)[1]
    scale = 2.0 ** max(e - 11, -24)
    return np.float32(math.copysign(np.rint(a / scale) * scale, v))


@strict
def round_activations(x, kind, out):
    """x float32 [T, K] -> out [T, K], rounded as ggml quantises activations (see quants)."""
    T, K = x.shape
    for t in numba.prange(T):
        if kind == ACT_NONE:
            for k in range(K):
                out[t, k] = x[t, k]
        elif kind == ACT_F16:
            for k in range(K):
                out[t, k] = f16_round(x[t, k])
        elif kind == ACT_BF16:
            src = x[t].view(np.uint32)
            dst = out[t].view(np.uint32)
            for k in range(K):
                u = np.uint64(src[k])
                dst[k] = np.uint32((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1)))
                                   >> np.uint64(16) << np.uint64(16))
        elif kind == ACT_Q8_0:
            for b in range(K // 32):
                amax = np.float32(0.0)
                for j in range(32):
                    amax = max(amax, abs(x[t, b * 32 + j]))
                inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
                d = f16_round(amax / np.float32(127.0))
                for j in range(32):
                    out[t, b * 32 + j] = d * np.rint(x[t, b * 32 + j] * inv)
        else:  # ACT_Q8_K
            for b in range(K // 256):
                amax = np.float32(0.0)
                m = np.float32(0.0)
                for j in range(256):
                    ax = abs(x[t, b * 256 + j])
                    if ax > amax:
                        amax = ax
                        m = x[t, b * 256 + j]
                if amax == 0:
                    for j in range(256):
                        out[t, b * 256 + j] = 0.0
                    continue
                s = np.float32(-127.0) / m
                d = np.float32(1.0) / s
                for j in range(256):
                    out[t, b * 256 + j] = d * min(np.float32(127.0), np.rint(x[t, b * 256 + j] * s))


# No NaN in the activations is assumed (``nnan``) so that the max-magnitude loops vectorise;
# every rounding is still a single IEEE operation, so the values are those of
# round_activations, bit for bit.
vector = numba.njit(parallel=PARALLEL, fastmath={"nnan", "nsz"}, cache=True, nogil=True)


@strict_helper
def _amax(v):
    m = np.float32(0.0)
    for i in range(v.size):
        m = max(m, abs(v[i]))
    return m


@vector
def quantize_int8(x, kind, xq, xd, n16, n32):
    """x float32 [T, K] -> ggml's 8-bit activation blocks for the panel kernels: xq int8
    [T, K], xd [T, K/32] (Q8_K's per-256 scale repeated for each 32), and the integer sums
    of the 8-bit values over each 16 and 32, n16 int16 [T, K/16] and n32 [T, K/32].
    ``xd * xq`` is exactly what round_activations gives. kind is ACT_Q8_0 or ACT_Q8_K."""
    T, K = x.shape
    for t in numba.prange(T):
        xt = x[t]
        if kind == ACT_Q8_0:
            for b in range(K // 32):
                v = xt[b * 32:b * 32 + 32]
                amax = _amax(v)
                inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
                xd[t, b] = f16_round(amax / np.float32(127.0))
                for h in range(2):
                    n = 0
                    for j in range(16 * h, 16 * h + 16):
                        q = np.int32(np.rint(v[j] * inv))
                        xq[t, b * 32 + j] = q
                        n += q
                    n16[t, 2 * b + h] = n
                n32[t, b] = n16[t, 2 * b] + n16[t, 2 * b + 1]
        else:  # ACT_Q8_K
            for b in range(K // 256):
                v = xt[b * 256:b * 256 + 256]
                amax = _amax(v)
                m = np.float32(0.0)
                for j in range(256):            # the first value of largest magnitude
                    if abs(v[j]) == amax:
                        m = v[j]
                        break
                s = np.float32(-127.0) / m if amax > 0 else np.float32(0.0)
                d = np.float32(1.0) / s if amax > 0 else np.float32(0.0)
                for c in range(16):
                    n = 0
                    for j in range(c * 16, c * 16 + 16):
                        q = np.int32(min(np.float32(127.0), np.rint(v[j] * s)))
                        xq[t, b * 256 + j] = q
                        n += q
                    n16[t, b * 16 + c] = n
                for c in range(8):
                    xd[t, b * 8 + c] = d
                    n32[t, b * 8 + c] = n16[t, b * 16 + 2 * c] + n16[t, b * 16 + 2 * c + 1]


@serial
def quantized_int8(x, kind):
    """quantize_int8 into new arrays: (xq, xd, n16, n32). One call from Python instead of
    five (a decode step's Python runs with cold caches)."""
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // 32), np.float32)
    n16 = np.empty((T, K // 16), np.int16)
    n32 = np.empty((T, K // 32), np.int16)
    quantize_int8(x, kind, xq, xd, n16, n32)
    return xq, xd, n16, n32
