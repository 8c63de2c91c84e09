"""Numba dequantisation of one weight row, for every supported GGML type.

``dequant_row(row, qtype, out)`` turns the raw bytes of one row (``uint8[bytes_per_row]``)
into ``float32[K]`` with exactly the values of :func:`numba_hybrid.quants.dequantize`
(products of an f16 scale and small integers are exact in float32, so only the final add
rounds, as in the NumPy code). f16 fields are decoded through a 65536-entry table because
Numba has no float16 on the CPU.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from .jit import helper

F16_TABLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
IQ4_TABLE = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                     dtype=np.float32)

# Type codes as plain ints for the jitted dispatch.
F32, F16, BF16 = int(QT.F32), int(QT.F16), int(QT.BF16)
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = int(QT.Q8_0), int(QT.Q4_0), int(QT.Q4_1), int(QT.Q5_0), int(QT.Q5_1)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(QT.Q2_K), int(QT.Q3_K), int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)
IQ4_NL, IQ4_XS = int(QT.IQ4_NL), int(QT.IQ4_XS)


@helper
def f16(row, o):
    """The little-endian f16 at byte o, as float32."""
    return F16_TABLE[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@helper
def i8(b):
    v = np.int32(b)
    return np.float32(v - 256 if v > 127 else v)


@helper
def _scale_min_k4(j, s, o):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block j from the 12-byte field at s[o:]."""
    if j < 4:
        sc = np.int32(s[o + j]) & 63
        m = np.int32(s[o + j + 4]) & 63
    else:
        sc = (np.int32(s[o + j + 4]) & 15) | ((np.int32(s[o + j - 4]) >> 6) << 4)
        m = (np.int32(s[o + j + 4]) >> 4) | ((np.int32(s[o + j]) >> 6) << 4)
    return np.float32(sc), np.float32(m)


@helper
def _q8_0(row, out):  # d:f16 | qs:i8[32]
    q = row.view(np.int8)
    for b in range(out.size // 32):
        o = b * 34
        d = f16(row, o)
        src = q[o + 2:o + 34]
        dst = out[b * 32:b * 32 + 32]
        for j in range(32):
            dst[j] = d * np.float32(src[j])


@helper
def _q4_0(row, out):  # d:f16 | qs:u8[16]; low nibbles are elements 0..15
    for b in range(out.size // 32):
        o = b * 18
        d = f16(row, o)
        src = row[o + 2:o + 18]
        dst = out[b * 32:b * 32 + 32]
        for j in range(16):
            q = np.int32(src[j])
            dst[j] = d * np.float32((q & 15) - 8)
            dst[j + 16] = d * np.float32((q >> 4) - 8)


@helper
def _q4_1(row, out):  # d:f16 | m:f16 | qs:u8[16]
    for b in range(out.size // 32):
        o = b * 20
        d, m = f16(row, o), f16(row, o + 2)
        for j in range(16):
            q = np.int32(row[o + 4 + j])
            out[b * 32 + j] = d * np.float32(q & 15) + m
            out[b * 32 + j + 16] = d * np.float32(q >> 4) + m


@helper
def _q5(row, out, bsize, has_min):
    """Q5_0 (d | qh[4] | qs[16], x = d*(q-16)) and Q5_1 (d | m | qh | qs, x = d*q + m)."""
    for b in range(out.size // 32):
        o = b * bsize
        d = f16(row, o)
        m = f16(row, o + 2) if has_min else np.float32(0.0)
        oh = o + (4 if has_min else 2)
        qh = (np.int64(row[oh]) | (np.int64(row[oh + 1]) << 8) | (np.int64(row[oh + 2]) << 16)
              | (np.int64(row[oh + 3]) << 24))
        for j in range(16):
            q = np.int64(row[oh + 4 + j])
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            if has_min:
                out[b * 32 + j] = d * np.float32(lo) + m
                out[b * 32 + j + 16] = d * np.float32(hi) + m
            else:
                out[b * 32 + j] = d * np.float32(lo - 16)
                out[b * 32 + j + 16] = d * np.float32(hi - 16)


@helper
def _q2_k(row, out):  # scales:u8[16] | qs:u8[64] | d:f16 | dmin:f16
    for b in range(out.size // 256):
        o = b * 84
        d, dmin = f16(row, o + 80), f16(row, o + 82)
        y = b * 256
        for half in range(2):
            for step in range(4):
                shift = 2 * step
                for part in range(2):
                    sc = np.int32(row[o + half * 8 + step * 2 + part])
                    dl = d * np.float32(sc & 15)
                    ml = dmin * np.float32(sc >> 4)
                    for l in range(16):
                        q = (np.int32(row[o + 16 + half * 32 + part * 16 + l]) >> shift) & 3
                        out[y] = dl * np.float32(q) - ml
                        y += 1


@helper
def _q3_k(row, out):  # hmask:u8[32] | qs:u8[64] | scales:u8[12] | d:f16
    for b in range(out.size // 256):
        o = b * 110
        d = f16(row, o + 108)
        y = b * 256
        for half in range(2):
            for step in range(4):
                shift = 2 * step
                hbit = half * 4 + step
                for part in range(2):
                    i = half * 8 + step * 2 + part
                    lo = (np.int32(row[o + 96 + i]) & 15) if i < 8 else (
                        np.int32(row[o + 96 + i - 8]) >> 4)
                    hi = (np.int32(row[o + 96 + 8 + (i % 4)]) >> (2 * (i // 4))) & 3
                    dl = d * np.float32((lo | (hi << 4)) - 32)
                    for l in range(16):
                        ll = part * 16 + l
                        q = (np.int32(row[o + 32 + half * 32 + ll]) >> shift) & 3
                        if (np.int32(row[o + ll]) >> hbit) & 1 == 0:
                            q -= 4
                        out[y] = dl * np.float32(q)
                        y += 1


@helper
def _q45_k(row, out, bsize, has_qh):
    """Q4_K (d:f16 | dmin:f16 | scales:u8[12] | qs:u8[128]) and Q5_K (the same with
    qh:u8[32] before qs: bit 2c / 2c+1 of qh[l] is the 5th bit of chunk c's low / high
    nibble). x = d*scale*q - dmin*min per 32-value sub-block."""
    qs0 = 48 if has_qh else 16
    for b in range(out.size // 256):
        o = b * bsize
        d, dmin = f16(row, o), f16(row, o + 2)
        for c in range(4):
            sc0, m0 = _scale_min_k4(2 * c, row, o + 4)
            sc1, m1 = _scale_min_k4(2 * c + 1, row, o + 4)
            d0, mm0, d1, mm1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            y = b * 256 + c * 64
            for l in range(32):
                q = np.int32(row[o + qs0 + c * 32 + l])
                lo, hi = q & 15, q >> 4
                if has_qh:
                    h = np.int32(row[o + 16 + l])
                    lo |= ((h >> (2 * c)) & 1) << 4
                    hi |= ((h >> (2 * c + 1)) & 1) << 4
                out[y + l] = d0 * np.float32(lo) - mm0
                out[y + 32 + l] = d1 * np.float32(hi) - mm1


@helper
def _q6_k(row, out):  # ql:u8[128] | qh:u8[64] | scales:i8[16] | d:f16
    sc = row.view(np.int8)
    for b in range(out.size // 256):
        o = b * 210
        d = f16(row, o + 208)
        for half in range(2):
            ql = row[o + half * 64:o + half * 64 + 64]
            qh = row[o + 128 + half * 32:o + 128 + half * 32 + 32]
            dst = out[b * 256 + half * 128:b * 256 + half * 128 + 128]
            s0 = o + 192 + half * 8
            for part in range(2):
                # 16 elements share a scale: part selects l in [16*part, 16*part+16)
                d0 = d * np.float32(sc[s0 + part])
                d1 = d * np.float32(sc[s0 + part + 2])
                d2 = d * np.float32(sc[s0 + part + 4])
                d3 = d * np.float32(sc[s0 + part + 6])
                for i in range(16):
                    l = part * 16 + i
                    a = np.int32(ql[l])
                    c = np.int32(ql[l + 32])
                    h = np.int32(qh[l])
                    dst[l] = d0 * np.float32(((a & 15) | ((h & 3) << 4)) - 32)
                    dst[l + 32] = d1 * np.float32(((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                    dst[l + 64] = d2 * np.float32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                    dst[l + 96] = d3 * np.float32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)


@helper
def _iq4_nl(row, out):  # d:f16 | qs:u8[16] (codebook indices)
    for b in range(out.size // 32):
        o = b * 18
        d = f16(row, o)
        for j in range(16):
            q = np.int32(row[o + 2 + j])
            out[b * 32 + j] = d * IQ4_TABLE[q & 15]
            out[b * 32 + j + 16] = d * IQ4_TABLE[q >> 4]


@helper
def _iq4_xs(row, out):  # d:f16 | scales_h:u16 | scales_l:u8[4] | qs:u8[128]
    for b in range(out.size // 256):
        o = b * 136
        d = f16(row, o)
        sh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
        for ib in range(8):
            ls = ((np.int32(row[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (
                ((sh >> (2 * ib)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            y = b * 256 + ib * 32
            for j in range(16):
                q = np.int32(row[o + 8 + ib * 16 + j])
                out[y + j] = dl * IQ4_TABLE[q & 15]
                out[y + j + 16] = dl * IQ4_TABLE[q >> 4]


@helper
def dequant_row(row, qtype, out):
    """Raw bytes of one row -> out float32[K]."""
    if qtype == Q8_0:
        _q8_0(row, out)
    elif qtype == Q4_K:
        _q45_k(row, out, 144, False)
    elif qtype == Q6_K:
        _q6_k(row, out)
    elif qtype == F32:
        bits = out.view(np.uint32)
        for k in range(out.size):
            bits[k] = (np.uint32(row[4 * k]) | (np.uint32(row[4 * k + 1]) << 8)
                       | (np.uint32(row[4 * k + 2]) << 16) | (np.uint32(row[4 * k + 3]) << 24))
    elif qtype == Q5_K:
        _q45_k(row, out, 176, True)
    elif qtype == Q4_0:
        _q4_0(row, out)
    elif qtype == IQ4_XS:
        _iq4_xs(row, out)
    elif qtype == Q2_K:
        _q2_k(row, out)
    elif qtype == Q3_K:
        _q3_k(row, out)
    elif qtype == BF16:
        bits = out.view(np.uint32)
        for k in range(out.size):
            bits[k] = (np.uint32(row[2 * k]) | (np.uint32(row[2 * k + 1]) << 8)) << 16
    elif qtype == F16:
        for k in range(out.size):
            out[k] = f16(row, 2 * k)
    elif qtype == Q4_1:
        _q4_1(row, out)
    elif qtype == Q5_0:
        _q5(row, out, 22, False)
    elif qtype == Q5_1:
        _q5(row, out, 24, True)
    elif qtype == IQ4_NL:
        _iq4_nl(row, out)
