"""Norms and element-wise glue. Legend: T tokens, D features, Hv value heads of dim Dv.

Sums of squares accumulate in float64, as ggml does, so the float32 results stay close to
the float64 reference."""

from __future__ import annotations

import numpy as np

from .jit import helper, kernel, prange
from .simd import exp32


@helper
def _inv_rms(x, eps):
    s = 0.0
    for i in range(x.size):
        s += np.float64(x[i]) * np.float64(x[i])
    return np.float32(1.0 / np.sqrt(s / x.size + eps))


@kernel
def rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.   x, out [T, D]; w [D]."""
    for t in prange(x.shape[0]):
        r = _inv_rms(x[t], eps)
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] * r * w[i]


@kernel
def add_rms_norm(x, y, w, eps, out):
    """Residual add then norm: x += y; out = rms_norm(x) * w.   x, y, out [T, D]."""
    for t in prange(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] += y[t, i]
        r = _inv_rms(x[t], eps)
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] * r * w[i]


@kernel
def add(x, y):
    """x += y.   [T, D]."""
    for t in prange(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] += y[t, i]


@kernel
def gated_rms_norm(o, z, w, eps, out):
    """Per head: rms_norm(o) * w * silu(z).   o, z, out [T, Hv*Dv]; w [Dv]."""
    T = o.shape[0]
    dv = w.size
    hv = o.shape[1] // dv
    for i in prange(T * hv):
        t, h = i // hv, i % hv
        a = h * dv
        r = _inv_rms(o[t, a:a + dv], eps)
        for j in range(dv):
            g = z[t, a + j]
            out[t, a + j] = o[t, a + j] * r * w[j] * (g / (np.float32(1.0) + exp32(-g)))


@kernel
def swiglu(gate, up, out):
    """out = silu(gate) * up.   [T, F]."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + exp32(-g)) * up[t, i]


@kernel
def swiglu_halves(both, out):
    """out = silu(gate) * up for both = [gate | up] (a fused gate and up product), [T, 2F]."""
    F = out.shape[1]
    for t in prange(both.shape[0]):
        for i in range(F):
            g = both[t, i]
            out[t, i] = g / (np.float32(1.0) + exp32(-g)) * both[t, F + i]
