"""Quantised matrix multiplication: out[T, N] = x[T, K] @ W[N, K]^T.

Legend: T tokens, K row length (input features), N rows (outputs), RB rows per task.

Work is split over blocks of RB weight rows (``prange``); each block is dequantised once
into a thread-local float32 tile and then dotted with every token. Every output element is
one call of the same ``dot`` on the same two vectors whatever T is, so a token's result
does not depend on the rest of the batch (bitwise batch invariance).
"""

from __future__ import annotations

import numpy as np
from numba.core import types
from numba.extending import overload

from .dequant import F16_TABLE, F32, dequant_row
from .jit import helper, kernel, prange, serial
from . import panels, rows

RB = 16


@serial
def arange(n):
    """np.arange(n), for kernels: there it would be a parallel loop of its own (jit.py)."""
    return np.arange(n)


@helper
def dot(a, b):
    s = np.float32(0.0)
    for k in range(a.size):
        s += a[k] * b[k]
    return s


@kernel
def matmul(x, raw, qtype, out):
    """x [T, K] f32, raw uint8 [N, bytes_per_row] of GGML type ``qtype`` -> out [T, N].
    F32 rows are read in place (the MoE router): the same dot of the same values as on a
    copy, without the copy and its allocation."""
    T, K = x.shape
    N = raw.shape[0]
    in_place = qtype == F32
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        w = np.empty((0 if in_place else RB, K), np.float32)
        if not in_place:
            for r in range(r0, r1):
                dequant_row(raw[r], qtype, w[r - r0])
        for t in range(T):
            xt = x[t]
            for r in range(r0, r1):
                row = raw[r].view(np.float32) if in_place else w[r - r0]
                out[t, r] = dot(row, xt)


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
    """Raw Q6_K rows uint8 [..., N, 210*K/256] -> (qs int8 [..., N, K], d [..., N, K/16], 4):
    unpack_q6_k's values with each sub-block scale times its super-block's d."""
    qs, sc, d = unpack_q6_k(raw)
    scale = d[..., None] * sc.reshape(d.shape + (16,)).astype(np.float32)
    return qs, np.ascontiguousarray(scale.reshape(qs.shape[:-1] + (-1,))), Q6_K_SHIFT


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


# ---- 4-bit values with group scales and mins: Q4_0, Q4_1 and Q4_K repacked ----------------
#
# The three types store 4-bit values n in groups of G bytes: byte l of a group holds element
# l of the group's first half in its low nibble and element l + G of its second half in its
# high nibble, and each half has a scale and a min, w = dl*n - ml. Q4_0: G = 16 (one 32-value
# block), dl = d and ml = 8*d for both halves (x = d*(n - 8)); Q4_1: G = 16, dl = d,
# ml = -m (x = d*n + m); Q4_K: G = 32 (two 32-value sub-blocks), dl = d*scale and ml =
# dmin*min of the low/high sub-block. dl*n is exact in float32 (d is an f16, scale and n are
# small integers; 8*d too), so the weights are the file's. They are repacked once at load
# into qs uint8 [N, K/2] (the file's bytes in order, headers stripped) and float32 dlo, dhi,
# mlo, mhi [N, K/(2G)], plus log2(G) (the shift, 4 or 5). For Q4_0 and Q4_1 the halves share
# their scale and min, so dhi is the same array as dlo and mhi as mlo. Costs: 0.75 bytes per
# weight for all three (Q4_0 and Q4_1: 16 bytes of nibbles + 2 floats, d and 8*d or d and
# -m, per 32 weights; Q4_K: 32 bytes + 4 floats per 64), against 0.5625 (Q4_0, Q4_K) and
# 0.625 (Q4_1) in the file. Activations are split the same way once per call (xl, xh: the
# elements under the low and high nibbles, [T, K/2]) with their sums per half group (sl, sh
# [T, K/(2G)]), so w.x = sum(dl*n*x) - sum(ml * sum(x)) is one flat vectorised loop over
# the bytes. As in dot_i8, the group shift must be a constant inside the loops: the
# kernels branch on it outside them.

Q4_0_SHIFT = Q4_1_SHIFT = 4          # log2 of the group: 16 bytes (32 values)
Q4_K_SHIFT = 5                       # 32 bytes (64 values)


def _repack_q4_legacy(raw: np.ndarray, block: int, has_min: bool):
    """Q4_0 / Q4_1 rows -> (qs, d, d, ml, ml, 4) with ml = 8*d or -m."""
    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, block)
    shape = lead + (-1,)
    d = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16).astype(np.float32)   # [blocks, 1]
    if has_min:
        ml = -np.ascontiguousarray(blocks[:, 2:4]).view(np.float16).astype(np.float32)
    else:
        ml = np.float32(8.0) * d                                       # exact: d is an f16
    qs = np.ascontiguousarray(blocks[:, block - 16:]).reshape(shape)
    d, ml = d.reshape(shape), ml.reshape(shape)
    return qs, d, d, ml, ml, Q4_0_SHIFT


def repack_q4_0(raw: np.ndarray):
    """Raw Q4_0 rows uint8 [..., N, 18*K/32] -> (qs, dlo, dhi, mlo, mhi, 4)."""
    return _repack_q4_legacy(raw, 18, False)


def repack_q4_1(raw: np.ndarray):
    """Raw Q4_1 rows uint8 [..., N, 20*K/32] -> (qs, dlo, dhi, mlo, mhi, 4)."""
    return _repack_q4_legacy(raw, 20, True)


def repack_q4_k(raw: np.ndarray):
    """Raw Q4_K rows uint8 [..., N, 144*K/256] -> (qs, dlo, dhi, mlo, mhi, 5)."""
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
    return (qs, *parts, Q4_K_SHIFT)


@helper
def _split_row(x, xl, xh, sl, sh, G):
    # Inlined with a literal G: constant trip counts.
    for c in range(sl.size):
        a = np.float32(0.0)
        b = np.float32(0.0)
        for l in range(G):
            xl[c * G + l] = x[c * 2 * G + l]
            xh[c * G + l] = x[c * 2 * G + G + l]
        for l in range(G):
            a += x[c * 2 * G + l]
            b += x[c * 2 * G + G + l]
        sl[c] = a
        sh[c] = b


@kernel
def split_q4_activations(x, shift, xl, xh, sl, sh):
    """x [T, K] -> xl, xh [T, K/2] (the elements under the low/high nibbles of groups of
    G = 1 << shift bytes) and their sums per half group, sl, sh [T, K/(2G)]."""
    for t in prange(x.shape[0]):
        if shift == Q4_K_SHIFT:
            _split_row(x[t], xl[t], xh[t], sl[t], sh[t], 32)
        else:
            _split_row(x[t], xl[t], xh[t], sl[t], sh[t], 16)


@helper
def dot_q4(qs, dlo, dhi, mlo, mhi, shift, xl, xh, sl, sh):
    # The shift must be a constant inside the loop for LLVM to vectorise it. Numba widens
    # integer arithmetic to 64 bits; the casts back to uint8 let LLVM keep the nibbles in
    # bytes and convert 16 lanes at a time (measured 1.4-1.6x faster than int32 nibbles).
    s = np.float32(0.0)
    if shift == Q4_K_SHIFT:
        for j in range(qs.size):
            b = qs[j]
            s += (dlo[j >> 5] * np.float32(np.uint8(b & 15)) * xl[j]
                  + dhi[j >> 5] * np.float32(np.uint8(b >> 4)) * xh[j])
    else:
        for j in range(qs.size):
            b = qs[j]
            s += (dlo[j >> 4] * np.float32(np.uint8(b & 15)) * xl[j]
                  + dhi[j >> 4] * np.float32(np.uint8(b >> 4)) * xh[j])
    m = np.float32(0.0)
    for c in range(mlo.size):
        m += mlo[c] * sl[c] + mhi[c] * sh[c]
    return s - m


@kernel
def matmul_q4(xl, xh, sl, sh, qs, dlo, dhi, mlo, mhi, shift, out):
    """Split activations (split_q4_activations) times repacked Q4_0/Q4_1/Q4_K
    (repack_q4_*) -> out [T, N]."""
    T = xl.shape[0]
    N = qs.shape[0]
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for t0 in range(0, T, TB):
            for r in range(r0, r1):
                for t in range(t0, min(T, t0 + TB)):
                    out[t, r] = dot_q4(qs[r], dlo[r], dhi[r], mlo[r], mhi[r], shift, xl[t],
                                       xh[t], sl[t], sh[t])


# ---- precision="fast": 8-bit activations times the weights, in integers -----------------
#
# quantize.quantize_int8 gives x int8 [T, K], xd [T, K/32] and the integer sums n16, n32.
# Q8_0, Q4_K and Q6_K matrices are repacked at load into panels of 16 rows (panels.py);
# each kernel call there takes a few panels and tokens (panels.tile). A task is a group of
# panels that passes over all tokens, so its weights (~20-40 KB) stay in L1/L2 while the
# tokens' activations stream past.

@kernel
def _unpack_q6_k(blocks, q, sc, d):
    """Q6_K blocks uint8 [nb, 210] -> q - 32 int8 [nb, 256] in element order, the int8
    sub-block scales [nb, 16] and d [nb]."""
    for b in prange(blocks.shape[0]):
        blk = blocks[b]
        for half in range(2):
            ql = 64 * half
            qh = 128 + 32 * half
            o = 128 * half
            for l in range(32):
                h = np.int32(blk[qh + l])
                lo, hi = np.int32(blk[ql + l]), np.int32(blk[ql + l + 32])
                q[b, o + l] = ((lo & 15) | ((h & 3) << 4)) - 32
                q[b, o + l + 32] = ((hi & 15) | (((h >> 2) & 3) << 4)) - 32
                q[b, o + l + 64] = ((lo >> 4) | (((h >> 4) & 3) << 4)) - 32
                q[b, o + l + 96] = ((hi >> 4) | (((h >> 6) & 3) << 4)) - 32
        for j in range(16):
            v = np.int32(blk[192 + j])
            sc[b, j] = v - 256 if v > 127 else v
        d[b] = F16_TABLE[np.int64(blk[208]) | (np.int64(blk[209]) << 8)]


def unpack_q6_k(raw: np.ndarray):
    """Raw Q6_K rows -> their values and scales: (qs int8 q - 32 [..., N, K], sc int8
    [..., N, K/16], d f32 [..., N, K/256])."""
    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, 210)
    nb = blocks.shape[0]
    q, sc, d = np.empty((nb, 256), np.int8), np.empty((nb, 16), np.int8), np.empty(nb, np.float32)
    _unpack_q6_k(blocks, q, sc, d)
    shape = lead + (-1,)
    return q.reshape(shape), sc.reshape(shape), d.reshape(shape)


# The panel repacking reads the file's blocks directly and moves 4 weights (one step of one
# row) per 32-bit word: ``out32`` is the panels' buffer viewed as uint32.

@helper
def _word(a, i):
    """The little-endian uint32 at byte i of a uint8 array."""
    return (np.uint32(a[i]) | (np.uint32(a[i + 1]) << 8) | (np.uint32(a[i + 2]) << 16)
            | (np.uint32(a[i + 3]) << 24))


@helper
def _panel_row_q4_k(row, o, o32, rr):
    """Q4_K row rr of a panel: the file's blocks (144 bytes) -> the panel's (2368)."""
    for sb in range(row.size // 144):
        src, dst = 144 * sb, 2368 * sb
        for i in range(2):
            o[dst + 2 * rr + i] = row[src + i]              # d
            o[dst + 32 + 2 * rr + i] = row[src + 2 + i]     # dmin
        for j in range(4):     # the six-bit scales and mins (ggml's get_scale_min_k4)
            lo, mid, hi = row[src + 4 + j], row[src + 8 + j], row[src + 12 + j]
            o[dst + 64 + 16 * j + rr] = lo & 63
            o[dst + 64 + 16 * (j + 4) + rr] = (hi & 15) | ((lo >> 6) << 4)
            o[dst + 192 + 32 * (j // 2) + 2 * rr + j % 2] = mid & 63
            o[dst + 192 + 32 * ((j + 4) // 2) + 2 * rr + j % 2] = (hi >> 4) | ((mid >> 6) << 4)
        for j in range(8):
            a = src + 16 + 32 * (j // 2)
            shift = 4 * (j % 2)
            for v in range(4):
                w0 = (_word(row, a + 8 * v) >> shift) & 0x0F0F0F0F
                w1 = (_word(row, a + 8 * v + 4) >> shift) & 0x0F0F0F0F
                o32[(dst + 320 + (4 * j + v) * 64) // 4 + rr] = w0 | (w1 << 4)


@helper
def _panel_row_q6_k(row, o, o32, rr):
    """Q6_K row rr of a panel: the file's blocks (210 bytes) -> the panel's (3392)."""
    for sb in range(row.size // 210):
        src, dst = 210 * sb, 3392 * sb
        o[dst + 2 * rr] = row[src + 208]
        o[dst + 2 * rr + 1] = row[src + 209]
        o[dst + 288 + 2 * rr] = 0                      # the alignment padding
        o[dst + 289 + 2 * rr] = 0
        for u in range(16):
            o[dst + 32 + 16 * u + rr] = row[src + 192 + u]
            # Element e = 16 u + 4 s + i: half h, quarter c, position l in ggml's layout
            # (ql nibble c >> 1 of byte 64 h + l + 32 (c & 1), qh bits 2c).
            h, c, l0 = u // 8, (u % 8) // 2, 16 * (u % 2)
            ql = src + 64 * h + l0 + 32 * (c & 1)
            qh = src + 128 + 32 * h + l0
            hi = np.uint32(0)
            for v in range(2):
                w0 = (_word(row, ql + 8 * v) >> (4 * (c >> 1))) & 0x0F0F0F0F
                w1 = (_word(row, ql + 8 * v + 4) >> (4 * (c >> 1))) & 0x0F0F0F0F
                o32[(dst + panels.Q6_K_LOW + (2 * u + v) * 64) // 4 + rr] = w0 | (w1 << 4)
            for s in range(4):
                hi |= ((_word(row, qh + 4 * s) >> (2 * c)) & 0x03030303) << (2 * s)
            o32[(dst + panels.Q6_K_HIGH + 64 * u) // 4 + rr] = hi


@kernel
def _panel_rows(raw, kind, out, out32, g0):
    """Raw rows uint8 [M, N, bytes] of panel type ``kind`` -> panels g0, g0 + 1, ... of
    out [M, G, bytes] (panels.py)."""
    M, N = raw.shape[0], raw.shape[1]
    G = (N + panels.PANEL - 1) // panels.PANEL
    for task in prange(M * G):
        m, g = task // G, task % G
        o, o32 = out[m, g0 + g], out32[m, g0 + g]
        for rr in range(min(panels.PANEL, N - g * panels.PANEL)):
            row = raw[m, g * panels.PANEL + rr]
            if kind == panels.Q4_K:
                _panel_row_q4_k(row, o, o32, rr)
            else:
                _panel_row_q6_k(row, o, o32, rr)


FILE_BLOCK_BYTES = {panels.Q4_K: 144, panels.Q6_K: 210}


def panel_shape(raw: np.ndarray, kind: int) -> tuple:
    """The shape of raw rows [..., N, bytes]' panels: [..., G, bytes of a panel]."""
    N = raw.shape[-2]
    nb = raw.shape[-1] // FILE_BLOCK_BYTES[kind]
    return raw.shape[:-2] + ((N + panels.PANEL - 1) // panels.PANEL,
                             nb * panels.BLOCK_BYTES[kind])


def panels_into(raw: np.ndarray, kind: int, out: np.ndarray, g0: int = 0) -> None:
    """Write raw rows [..., N, bytes] as panels g0, g0 + 1, ... of out [..., G, bytes]
    (whose padding rows, if N is not a multiple of 16, must already be zero)."""
    M = int(np.prod(raw.shape[:-2], dtype=np.int64))
    out3 = out.reshape((M,) + out.shape[-2:])
    _panel_rows(raw.reshape((M,) + raw.shape[-2:]), kind, out3, out3.view(np.uint32), g0)


def panel_buffer(shape: tuple, zero: bool) -> np.ndarray:
    """An uninitialised (or zeroed) uint8 array for panels, starting on a cache line: the
    kernels' 64-byte weight loads then never straddle two lines (numpy's large arrays
    start 16 bytes into a page)."""
    n = int(np.prod(shape, dtype=np.int64))
    buf = (np.zeros if zero else np.empty)(n + 64, np.uint8)
    skip = -buf.ctypes.data % 64
    return buf[skip:skip + n].reshape(shape)


def panels_of(raw: np.ndarray, kind: int):
    """Raw rows [..., N, bytes] -> (panels uint8 [..., G, bytes], kind)."""
    # Only a partial last panel has rows that no write reaches: zero its padding.
    out = panel_buffer(panel_shape(raw, kind), zero=raw.shape[-2] % panels.PANEL != 0)
    panels_into(raw, kind, out)
    return out, kind


@kernel
def matmul_panels(x, xd, n16, n32, wp, kind, out):
    """8-bit activations (quantize.quantize_int8) times a matrix in panels -> out [T, N]."""
    T, G = x.shape[0], wp.shape[0]
    tok = arange(T)
    gp, tp = panels.tile(kind, T)
    for b in prange((G + gp - 1) // gp):
        g0 = b * gp
        ng = min(gp, G - g0)
        for i0 in range(0, T, tp):
            panels.panel_tile(kind, wp, x, xd, n16, n32, tok, i0, min(tp, T - i0), g0, ng, out)


# Q8_0 in precision="fast": the file's rows read in place (rows.py). ``ws`` is a tuple of
# Q8_0 matrices with the same row length whose rows are stacked into one product (the
# matrices fused at load: forward.FUSED).

@kernel
def matmul_q8_0_rows(x, xd, n16, n32, ws, out):
    """8-bit activations (quantize.quantize_int8, Q8_0 blocks) times the Q8_0 matrices ws
    (uint8 [N_m, 34 K/32] each, the file's bytes) -> out [T, sum of N_m]. Tasks are blocks
    of RB rows; tokens go by rows.TOKENS, each block of rows passing once per group."""
    T, N = x.shape[0], out.shape[1]
    acts = rows.q8_0_activations(x, xd)
    tok = arange(T)
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for i0 in range(0, T, rows.TOKENS):
            nt = min(rows.TOKENS, T - i0)
            start = 0
            for m in range(len(ws)):
                start = rows.stacked(ws[m], start, acts, tok, i0, nt, r0, r1, out)


# The product of 8-bit activations and a weight in the integer layout of fast precision, as
# the compiled blocks (moe.moe_block, blocks.py) take it: (panels, type code), or a tuple of
# Q8_0 matrices whose rows are stacked (forward.QWeight.rows) and -1.

def dense_product(q, w, kind, out):
    """out [T, N] = the 8-bit activations q times the matrix w."""
    raise NotImplementedError("compiled only (overload below)")


@overload(dense_product, jit_options={"cache": True})
def _dense_product(q, w, kind, out):
    if isinstance(w, types.BaseTuple):
        def rows_impl(q, w, kind, out):
            matmul_q8_0_rows(q[0], q[1], q[2], q[3], w, out)
        return rows_impl

    def panels_impl(q, w, kind, out):
        matmul_panels(q[0], q[1], q[2], q[3], w, kind, out)
    return panels_impl
