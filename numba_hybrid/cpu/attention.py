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
from .simd import exp32, prefetch_line

# Cached positions a head's loops ask for ahead of use: its keys and values lie one row of
# every n_kv in the cache, a stride the hardware prefetcher follows too late (decode at
# position ~520, in the model: 171 -> 125 us per call).
AHEAD = 6


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
def _prefetch(a):
    """Ask for the cache lines of the contiguous vector a."""
    for off in range(0, a.size * a.itemsize, 64):
        prefetch_line(a, off)


@helper
def _angles(p, inv_freq, cos, sin):
    for i in range(inv_freq.size):
        ang = p * inv_freq[i]
        cos[i] = np.cos(ang)
        sin[i] = np.sin(ang)


@helper
def _scores(kj, q, scale, scores, j):
    """scores[r, j] = (kj . q[r]) * scale for every query head r of a group; four heads
    share each load of kj."""
    group, hd = q.shape
    for r in range(0, group - group % 4, 4):
        q0, q1, q2, q3 = q[r], q[r + 1], q[r + 2], q[r + 3]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for d in range(hd):
            k = kj[d]
            s0 += k * q0[d]
            s1 += k * q1[d]
            s2 += k * q2[d]
            s3 += k * q3[d]
        scores[r, j], scores[r + 1, j] = s0 * scale, s1 * scale
        scores[r + 2, j], scores[r + 3, j] = s2 * scale, s3 * scale
    for r in range(group - group % 4, group):
        qr = q[r]
        s = np.float32(0.0)
        for d in range(hd):
            s += kj[d] * qr[d]
        scores[r, j] = s * scale


@helper
def _weighted_values(v, j, g, e, acc):
    """acc[r] += sum over i < 8 of e[r, j + i] * v[j + i, g], as one sum per element (a
    fixed tree), for every query head r: each accumulator is loaded and stored once per 8
    values."""
    v0, v1, v2, v3 = v[j, g], v[j + 1, g], v[j + 2, g], v[j + 3, g]
    v4, v5, v6, v7 = v[j + 4, g], v[j + 5, g], v[j + 6, g], v[j + 7, g]
    for r in range(acc.shape[0]):
        er, ar = e[r], acc[r]
        e0, e1, e2, e3 = er[j], er[j + 1], er[j + 2], er[j + 3]
        e4, e5, e6, e7 = er[j + 4], er[j + 5], er[j + 6], er[j + 7]
        for d in range(ar.size):
            ar[d] += (((e0 * v0[d] + e1 * v1[d]) + (e2 * v2[d] + e3 * v3[d]))
                      + ((e4 * v4[d] + e5 * v5[d]) + (e6 * v6[d] + e7 * v7[d])))


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
    # Per (token, KV head): the query heads that share the head's keys and values go
    # together, so each cached key and value is read once for all of them. The values are
    # summed 8 positions at a time (then one by one for the last p + 1 mod 8): the order
    # depends on the position only, so each (token, query head) computes the same sums in
    # the same order for any batch.
    scale = np.float32(1.0 / np.sqrt(hd))
    for i in prange(T * nkv):
        t, g = i // nkv, i % nkv
        slot, p = tok_slot[t], positions[t]
        cos = np.empty(half, np.float32)
        sin = np.empty(half, np.float32)
        _angles(p, inv_freq, cos, sin)
        q = np.empty((group, hd), np.float32)
        for r in range(group):
            base = (g * group + r) * 2 * hd
            _norm_rope(qg[t, base:base + hd], q_norm, eps, cos, sin, q[r])
        scores = np.empty((group, p + 1), np.float32)
        for j in range(min(AHEAD, p + 1)):
            _prefetch(k_cache[slot, j, g])
        for j in range(p + 1):
            _prefetch(k_cache[slot, min(j + AHEAD, p), g])
            _scores(k_cache[slot, j, g], q, scale, scores, j)
        for j in range(min(2 * AHEAD, p + 1)):
            _prefetch(v_cache[slot, j, g])
        total = np.empty(group, np.float32)
        for r in range(group):
            m = np.float32(-np.inf)
            for j in range(p + 1):     # not max(): numba calls it, once per score
                if scores[r, j] > m:
                    m = scores[r, j]
            for j in range(p + 1):
                scores[r, j] = exp32(scores[r, j] - m)
            tr = np.float32(0.0)        # a loop of its own: no loop both stores and sums
            for j in range(p + 1):
                tr += scores[r, j]
            total[r] = tr
        acc = np.zeros((group, hd), np.float32)
        n = p + 1
        for j in range(0, n - n % 8, 8):
            for u in range(8):
                _prefetch(v_cache[slot, min(j + 2 * AHEAD + u, p), g])
            _weighted_values(v_cache[slot], j, g, scores, acc)
        for j in range(n - n % 8, n):
            vj = v_cache[slot, j, g]
            for r in range(group):
                e, ar = scores[r, j], acc[r]
                for d in range(hd):
                    ar[d] += e * vj[d]
        for r in range(group):
            h = g * group + r
            base = h * 2 * hd
            for d in range(hd):
                gate = qg[t, base + hd + d]
                out[t, h * hd + d] = acc[r, d] / total[r] / (np.float32(1.0) + exp32(-gate))
