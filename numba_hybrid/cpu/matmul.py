"""Quantised matrix multiplication: out[T, N] = x[T, K] @ W[N, K]^T.

Legend: T tokens, K row length (input features), N rows (outputs), RB rows per task.

Work is split over blocks of RB weight rows (``prange``); each block is dequantised once
into a thread-local float32 tile and then dotted with every token. Every output element is
one call of the same ``dot`` on the same two vectors whatever T is, so a token's result
does not depend on the rest of the batch (bitwise batch invariance).
"""

from __future__ import annotations

import numpy as np

from .dequant import dequant_row
from .jit import helper, kernel, prange

RB = 16


@helper
def dot(a, b):
    s = np.float32(0.0)
    for k in range(a.size):
        s += a[k] * b[k]
    return s


@kernel
def matmul(x, raw, qtype, out):
    """x [T, K] f32, raw uint8 [N, bytes_per_row] of GGML type ``qtype`` -> out [T, N]."""
    T, K = x.shape
    N = raw.shape[0]
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        w = np.empty((RB, K), np.float32)
        for r in range(r0, r1):
            dequant_row(raw[r], qtype, w[r - r0])
        for t in range(T):
            xt = x[t]
            for r in range(r0, r1):
                out[t, r] = dot(w[r - r0], xt)


@kernel
def gather_rows(raw, qtype, rows, out):
    """Dequantise the rows ``rows`` of a matrix (the token embedding lookup)."""
    for i in prange(rows.size):
        dequant_row(raw[rows[i]], qtype, out[i])


# ---- Q8_0 repacked ----------------------------------------------------------------------
#
# Q8_0 weights are repacked once at load into int8 values qs [N, K] and float32 block scales
# d [N, K/32] (1.125 bytes per weight instead of 1.0625). A flat loop over K then vectorises
# (int8 loads, a gather of the scale, FMA), and each weight is used straight from the
# registers without a dequantised copy. Rows are split over threads; tokens are taken in
# blocks of TB so their activations stay in L2 while a block of rows passes over them.

TB = 16


def repack_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw Q8_0 rows uint8 [..., N, 34*K/32] -> (qs int8 [..., N, K], d float32 [..., N, K/32])."""
    blocks = raw.reshape(raw.shape[:-1] + (-1, 34))
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return qs.reshape(raw.shape[:-1] + (-1,)), np.ascontiguousarray(d)


@helper
def dot_q8_0(qs, d, x):
    s = np.float32(0.0)
    for k in range(qs.size):
        s += np.float32(qs[k]) * d[k >> 5] * x[k]
    return s


@kernel
def matmul_q8_0(x, qs, d, out):
    """x [T, K] f32, qs int8 [N, K], d f32 [N, K/32] -> out [T, N]."""
    T = x.shape[0]
    N = qs.shape[0]
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for t0 in range(0, T, TB):
            for r in range(r0, r1):
                q, dr = qs[r], d[r]
                for t in range(t0, min(T, t0 + TB)):
                    out[t, r] = dot_q8_0(q, dr, x[t])


# ---- Q4_K repacked ----------------------------------------------------------------------
#
# Q4_K is repacked into its 4-bit values qs uint8 [N, K/2] (the file's byte order: byte j
# holds element (j//32)*64 + j%32 in its low nibble and that + 32 in its high nibble) and
# float32 sub-block scales and mins, split by nibble: dlo/dhi = d*scale and mlo/mhi =
# dmin*min of the low/high sub-block, [N, K/64] each (0.75 bytes per weight instead of
# 0.5625). Activations are split the same way once per call (xl, xh) with their sums per
# sub-block (sl, sh), so w.x = sum(dl*q*x) - sum(m * sum(x)) is one flat vectorised loop.


def repack_q4_k(raw: np.ndarray):
    """Raw Q4_K rows uint8 [..., N, 144*K/256] -> (qs, dlo, dhi, mlo, mhi)."""
    from ..quants import _k_scale_min

    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = _k_scale_min(blocks[:, 4:16])
    dl, ml = d * sc, dmin * m                                          # [blocks, 8]
    shape = lead + (-1,)
    qs = np.ascontiguousarray(blocks[:, 16:]).reshape(shape)
    parts = [np.ascontiguousarray(a).reshape(shape)
             for a in (dl[:, 0::2], dl[:, 1::2], ml[:, 0::2], ml[:, 1::2])]
    return (qs, *parts)


@kernel
def split_q4_k_activations(x, xl, xh, sl, sh):
    """x [T, K] -> xl, xh [T, K/2] (low/high-nibble elements) and their sums per 32,
    sl, sh [T, K/64]."""
    T, K = x.shape
    for t in prange(T):
        for c in range(K // 64):
            a = np.float32(0.0)
            b = np.float32(0.0)
            for l in range(32):
                xl[t, c * 32 + l] = x[t, c * 64 + l]
                xh[t, c * 32 + l] = x[t, c * 64 + 32 + l]
            for l in range(32):
                a += x[t, c * 64 + l]
                b += x[t, c * 64 + 32 + l]
            sl[t, c] = a
            sh[t, c] = b


@helper
def dot_q4_k(qs, dlo, dhi, mlo, mhi, xl, xh, sl, sh):
    s = np.float32(0.0)
    for j in range(qs.size):
        b = np.int32(qs[j])
        s += dlo[j >> 5] * np.float32(b & 15) * xl[j] + dhi[j >> 5] * np.float32(b >> 4) * xh[j]
    m = np.float32(0.0)
    for c in range(mlo.size):
        m += mlo[c] * sl[c] + mhi[c] * sh[c]
    return s - m


@kernel
def matmul_q4_k(xl, xh, sl, sh, qs, dlo, dhi, mlo, mhi, out):
    """Split activations (split_q4_k_activations) times repacked Q4_K -> out [T, N]."""
    T = xl.shape[0]
    N = qs.shape[0]
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for t0 in range(0, T, TB):
            for r in range(r0, r1):
                for t in range(t0, min(T, t0 + TB)):
                    out[t, r] = dot_q4_k(qs[r], dlo[r], dhi[r], mlo[r], mhi[r], xl[t], xh[t],
                                         sl[t], sh[t])
