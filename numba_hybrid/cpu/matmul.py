"""Quantised matrix multiplication: out[T, N] = x[T, K] @ W[N, K]^T.

Legend: T tokens, K row length (input features), N rows (outputs), RB rows per task.

Work is split over blocks of RB weight rows (``prange``); each block is dequantised once
into a thread-local float32 tile and then dotted with every token. Every output element is
one call of the same ``dot`` on the same two vectors whatever T is, so a token's result
does not depend on the rest of the batch (bitwise batch invariance).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

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


# ---- int8 values with block scales: Q8_0 and Q6_K repacked ---------------------------
#
# Q8_0 and Q6_K weights are repacked once at load into int8 values qs [N, K] and float32
# block scales d [N, K >> shift] (Q8_0: blocks of 32, d = the block's f16 scale; Q6_K:
# blocks of 16, d = super-block scale * 8-bit sub-block scale, q - 32 stored as int8). Both
# products are exact in float32, so the weights are exactly the file's. Costs: 1.125 bytes
# per Q8_0 weight (file: 1.0625), 1.25 per Q6_K weight (file: 0.8203). A flat loop over K
# then vectorises (int8 loads, a gather of the scale, FMA) and each weight is used straight
# from the registers, without a dequantised copy. Rows are split over threads; tokens are
# taken in blocks of TB so their activations stay in L2 while a block of rows passes.

TB = 16
Q8_0_SHIFT, Q6_K_SHIFT = 5, 4        # log2 of the scale block: 32 and 16 values


def repack_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw Q8_0 rows uint8 [..., N, 34*K/32] -> (qs int8 [..., N, K], d [..., N, K/32], 5)."""
    blocks = raw.reshape(raw.shape[:-1] + (-1, 34))
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return qs.reshape(raw.shape[:-1] + (-1,)), np.ascontiguousarray(d), Q8_0_SHIFT


def repack_q6_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw Q6_K rows uint8 [..., N, 210*K/256] -> (qs int8 [..., N, K], d [..., N, K/16], 4)."""
    from ..quants import dequantize

    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, 210)
    scale = (blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
             * blocks[:, 192:208].view(np.int8).astype(np.float32))        # [blocks, 16]
    q = np.empty((blocks.shape[0], 256), np.int8)
    step = 1 << 14                                       # bounds the float32 temporary
    for i in range(0, blocks.shape[0], step):
        # The 6-bit values minus 32, in element order: dequantise with unit scales.
        unit = blocks[i:i + step].copy()
        unit[:, 192:208] = 1
        unit[:, 208:210] = np.array([1.0], np.float16).view(np.uint8)
        q[i:i + step] = dequantize(unit, QT.Q6_K).reshape(-1, 256)
    return (q.reshape(lead + (-1,)), np.ascontiguousarray(scale).reshape(lead + (-1,)),
            Q6_K_SHIFT)


@helper
def dot_i8(qs, d, shift, x):
    # The shift must be a constant inside the loop for LLVM to vectorise it.
    s = np.float32(0.0)
    if shift == Q8_0_SHIFT:
        for k in range(qs.size):
            s += np.float32(qs[k]) * d[k >> 5] * x[k]
    else:
        for k in range(qs.size):
            s += np.float32(qs[k]) * d[k >> 4] * x[k]
    return s


@kernel
def matmul_i8(x, qs, d, shift, out):
    """x [T, K] f32, qs int8 [N, K], d f32 [N, K >> shift] -> out [T, N]."""
    T = x.shape[0]
    N = qs.shape[0]
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for t0 in range(0, T, TB):
            for r in range(r0, r1):
                q, dr = qs[r], d[r]
                for t in range(t0, min(T, t0 + TB)):
                    out[t, r] = dot_i8(q, dr, shift, x[t])


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
