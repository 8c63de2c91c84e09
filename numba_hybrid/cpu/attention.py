"""Gated full attention with partial NeoX RoPE, GQA and the per-slot KV cache.

Legend: T tokens, S slots, nh query heads, nkv KV heads, hd head dim, n_rot rotated dims.
qg [T, nh*2*hd] holds per head [query | gate]. The cache is [S, n_ctx, nkv, hd].
First every token's key and value are normalised, rotated and stored at (slot, position);
then each (token, head) attends over its slot's positions 0..pos.
"""

from __future__ import annotations

import numpy as np

from .jit import helper, kernel, prange
from .norm import _inv_rms
from .simd import exp32


@helper
def _norm_rope(x, w, eps, cos, sin, out):
    """out = rope(rms_norm(x) * w) on the first 2*cos.size dims (NeoX pairing i, i+half)."""
    r = _inv_rms(x, eps)
    for i in range(x.size):
        out[i] = x[i] * r * w[i]
    half = cos.size
    for i in range(half):
        a, b = out[i], out[i + half]
        out[i] = a * cos[i] - b * sin[i]
        out[i + half] = b * cos[i] + a * sin[i]


@helper
def _angles(p, inv_freq, cos, sin):
    for i in range(inv_freq.size):
        ang = p * inv_freq[i]
        cos[i] = np.cos(ang)
        sin[i] = np.sin(ang)


@kernel
def attention(qg, kx, vx, q_norm, k_norm, eps, inv_freq, k_cache, v_cache, positions,
              tok_slot, out):
    T = qg.shape[0]
    nkv, hd = k_cache.shape[2], k_cache.shape[3]
    nh = out.shape[1] // hd
    group = nh // nkv
    half = inv_freq.size
    for t in prange(T):
        slot, p = tok_slot[t], positions[t]
        cos = np.empty(half, np.float32)
        sin = np.empty(half, np.float32)
        _angles(p, inv_freq, cos, sin)
        for g in range(nkv):
            _norm_rope(kx[t, g * hd:(g + 1) * hd], k_norm, eps, cos, sin, k_cache[slot, p, g])
            for d in range(hd):
                v_cache[slot, p, g, d] = vx[t, g * hd + d]
    scale = np.float32(1.0 / np.sqrt(hd))
    for i in prange(T * nh):
        t, h = i // nh, i % nh
        slot, p = tok_slot[t], positions[t]
        g = h // group
        cos = np.empty(half, np.float32)
        sin = np.empty(half, np.float32)
        _angles(p, inv_freq, cos, sin)
        q = np.empty(hd, np.float32)
        base = h * 2 * hd
        _norm_rope(qg[t, base:base + hd], q_norm, eps, cos, sin, q)
        scores = np.empty(p + 1, np.float32)
        m = np.float32(-np.inf)
        for j in range(p + 1):
            kj = k_cache[slot, j, g]
            s = np.float32(0.0)
            for d in range(hd):
                s += kj[d] * q[d]
            s *= scale
            scores[j] = s
            m = max(m, s)
        total = np.float32(0.0)
        acc = np.zeros(hd, np.float32)
        for j in range(p + 1):
            e = exp32(scores[j] - m)
            total += e
            vj = v_cache[slot, j, g]
            for d in range(hd):
                acc[d] += e * vj[d]
        for d in range(hd):
            gate = qg[t, base + hd + d]
            out[t, h * hd + d] = acc[d] / total / (np.float32(1.0) + exp32(-gate))
