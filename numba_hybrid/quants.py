"""GGML weight types: block geometry, which types this engine supports, and NumPy
dequantisation (the exact values every backend must reproduce).

Each ``_dequant_*`` function maps uint8 blocks ``[n_blocks, bytes_per_block]`` to float32
``[n_blocks, elems_per_block]``. The float operations are done in float32 in the same order
as ``gguf.quants`` (e.g. ``(d * sc) * q - (dmin * m)``) so results are bitwise equal to it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from .errors import ModelFormatError, UnsupportedModelError

# Types this engine loads and computes with.
SUPPORTED_TYPES = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS,
)

# Non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS.
IQ4_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)

# Blocks dequantised per step: bounds the float32 temporaries for big tensors.
_CHUNK_BLOCKS = 1 << 14


def block_geometry(qtype: QT) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def check_supported(qtype: QT, tensor_name: str) -> None:
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"unsupported tensor type {qtype.name} in tensor {tensor_name!r} "
            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
        )


# ---- field helpers ------------------------------------------------------------------------

def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian f16 at byte ``offset`` of each block, as float32 ``[n, 1]``."""
    return blocks[:, offset:offset + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., k]`` bytes -> ``[..., 2k]``: all low nibbles, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(word: np.ndarray, n_bits: int, width: int = 1) -> np.ndarray:
    """Fields of ``width`` bits of ``word[..., m]``, lowest first -> ``[..., n_bits//width, m]``."""
    shifts = np.arange(0, n_bits, width, dtype=word.dtype).reshape(-1, 1)
    return (word[..., None, :] >> shifts) & ((1 << width) - 1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte field -> 8 six-bit scales and 8 six-bit mins (float32 ``[n, 8]``).

    Bytes 0..3 hold sc[0..3] (low 6 bits) + high bits of sc[4..7]; bytes 4..7 the same for
    the mins; bytes 8..11 hold the low nibbles of sc[4..7] (low) and m[4..7] (high).
    """
    lo, mid, hi = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


# ---- one function per type ----------------------------------------------------------------

def _dequant_f32(blocks):  # f32
    return blocks.view("<f4")


def _dequant_f16(blocks):  # f16
    return blocks.view("<f2").astype(np.float32)


def _dequant_bf16(blocks):  # bf16: the top half of an f32
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(blocks):  # d:f16 | qs:i8[32]
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _dequant_q4_0(blocks):  # d:f16 | qs:u8[16]
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.float32) - 8)


def _dequant_q4_1(blocks):  # d:f16 | m:f16 | qs:u8[16]
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks, 2)


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh:u8[4] (u32, bit j = 5th bit of element j) + qs:u8[16] -> 5-bit values [n, 32]."""
    high = _bits(qh.view("<u4"), 32)[:, :, 0].astype(np.uint8)
    return _nibbles(qs) | (high << 4)


def _dequant_q5_0(blocks):  # d:f16 | qh:u8[4] | qs:u8[16]
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:])
    return _f16(blocks, 0) * (q.astype(np.float32) - 16)


def _dequant_q5_1(blocks):  # d:f16 | m:f16 | qh:u8[4] | qs:u8[16]
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:])
    return _f16(blocks, 0) * q.astype(np.float32) + _f16(blocks, 2)


def _k_quants_2bit(qs: np.ndarray) -> np.ndarray:
    """qs:u8[64] -> 2-bit values [n, 16, 16] in element order: per 128-half (32 bytes),
    per shift 0,2,4,6: 16 values from bytes 0..15, then 16 from bytes 16..31."""
    return _bits(qs.reshape(-1, 2, 32), 8, 2).reshape(-1, 16, 16)


def _dequant_q2_k(blocks):  # scales:u8[16] (min<<4 | scale) | qs:u8[64] | d:f16 | dmin:f16
    scales = blocks[:, 0:16]
    dl = (_f16(blocks, 80) * (scales & 0x0F).astype(np.float32))[:, :, None]
    ml = (_f16(blocks, 82) * (scales >> 4).astype(np.float32))[:, :, None]
    q = _k_quants_2bit(blocks[:, 16:80]).astype(np.float32)
    return (dl * q - ml).reshape(len(blocks), -1)


def _dequant_q3_k(blocks):  # hmask:u8[32] | qs:u8[64] | scales:u8[12] | d:f16
    scales = blocks[:, 96:108]
    # 16 six-bit scales: low nibbles in bytes 0..7 (low halves first), 2 high bits in 8..11.
    low = _nibbles(scales[:, 0:8])
    high = _bits(scales[:, 8:12], 8, 2).reshape(-1, 16)
    sc = (low | (high << 4)).astype(np.float32) - 32
    dl = (_f16(blocks, 108) * sc)[:, :, None]
    # Bit b of hmask[l] belongs to the b-th (half, shift) step; a clear bit means minus 4.
    hbit = _bits(blocks[:, 0:32], 8).reshape(-1, 16, 16)
    q = _k_quants_2bit(blocks[:, 32:96]).astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)
    return (dl * q.astype(np.float32)).reshape(len(blocks), -1)


def _k_quants_4bit(qs: np.ndarray) -> np.ndarray:
    """qs:u8[128] -> [n, 8, 32]: chunk c of 32 bytes gives sub-block 2c (low nibbles) and
    2c+1 (high nibbles)."""
    return _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)


def _dequant_q4_k(blocks):  # d:f16 | dmin:f16 | scales:u8[12] | qs:u8[128]
    sc, m = _k_scale_min(blocks[:, 4:16])
    dl = (_f16(blocks, 0) * sc)[:, :, None]
    ml = (_f16(blocks, 2) * m)[:, :, None]
    q = _k_quants_4bit(blocks[:, 16:144]).astype(np.float32)
    return (dl * q - ml).reshape(len(blocks), -1)


def _dequant_q5_k(blocks):  # d:f16 | dmin:f16 | scales:u8[12] | qh:u8[32] | qs:u8[128]
    sc, m = _k_scale_min(blocks[:, 4:16])
    dl = (_f16(blocks, 0) * sc)[:, :, None]
    ml = (_f16(blocks, 2) * m)[:, :, None]
    # Bit j of qh[l] is the 5th bit of element l of sub-block j.
    high = _bits(blocks[:, 16:48], 8)
    q = (_k_quants_4bit(blocks[:, 48:176]) | (high << 4)).astype(np.float32)
    return (dl * q - ml).reshape(len(blocks), -1)


def _dequant_q6_k(blocks):  # ql:u8[128] | qh:u8[64] | scales:i8[16] | d:f16
    # Per 128-half: 4 groups of 32 = low nibbles of ql[0..31], ql[32..63], then high
    # nibbles of the same, with 2 high bits from qh[0..31] at shifts 0, 2, 4, 6.
    low = np.stack([blocks[:, 0:128] & 0x0F, blocks[:, 0:128] >> 4], axis=1)  # [n, nib, 128]
    low = low.reshape(-1, 2, 2, 2, 32).transpose(0, 2, 1, 3, 4).reshape(-1, 2, 4, 32)
    high = _bits(blocks[:, 128:192].reshape(-1, 2, 32), 8, 2)
    q = (low | (high << 4)).astype(np.float32) - 32
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    dl = (_f16(blocks, 208) * sc)[:, :, None]
    return (dl * q.reshape(-1, 16, 16)).reshape(len(blocks), -1)


def _dequant_iq4_nl(blocks):  # d:f16 | qs:u8[16] (codebook indices)
    return _f16(blocks, 0) * IQ4_VALUES[_nibbles(blocks[:, 2:])]


def _dequant_iq4_xs(blocks):  # d:f16 | scales_h:u16 | scales_l:u8[4] | qs:u8[128]
    # 8 six-bit scales: low nibble from scales_l (low half first), 2 high bits from scales_h.
    low = _nibbles(blocks[:, 4:8][:, :, None]).reshape(-1, 8)
    high = _bits(blocks[:, 2:4].view("<u2"), 16, 2)[:, :, 0].astype(np.uint8)
    ls = (low | (high << 4)).astype(np.float32) - 32
    dl = (_f16(blocks, 0) * ls)[:, :, None]
    q = IQ4_VALUES[_nibbles(blocks[:, 8:136].reshape(-1, 8, 16))]
    return (dl * q).reshape(len(blocks), -1)


_DEQUANT: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: _dequant_f32, QT.F16: _dequant_f16, QT.BF16: _dequant_bf16,
    QT.Q8_0: _dequant_q8_0, QT.Q4_0: _dequant_q4_0, QT.Q4_1: _dequant_q4_1,
    QT.Q5_0: _dequant_q5_0, QT.Q5_1: _dequant_q5_1,
    QT.Q2_K: _dequant_q2_k, QT.Q3_K: _dequant_q3_k, QT.Q4_K: _dequant_q4_k,
    QT.Q5_K: _dequant_q5_k, QT.Q6_K: _dequant_q6_k,
    QT.IQ4_NL: _dequant_iq4_nl, QT.IQ4_XS: _dequant_iq4_xs,
}
assert set(_DEQUANT) == set(SUPPORTED_TYPES)

# What GGUFReader hands out already typed (not as raw bytes).
_TYPED = {QT.F32: np.float32, QT.F16: np.float16}


def dequantize(data: np.ndarray, qtype: QT, *, name: str = "?") -> np.ndarray:
    """Raw tensor data (as ``GGUFReader`` gives it) -> float32 array of the logical shape.

    ``data`` is a float32/float16 array for F32/F16, else uint8 ``[..., bytes_per_row]``.
    ``name`` only labels error messages.
    """
    qtype = QT(qtype)
    check_supported(qtype, name)
    data = np.asarray(data)
    if qtype in _TYPED and data.dtype == _TYPED[qtype]:
        return data.astype(np.float32, copy=False)
    if data.ndim == 0:
        raise ModelFormatError(f"tensor {name!r} of type {qtype.name} has no row dimension")
    data = np.ascontiguousarray(data).view(np.uint8)
    block_size, type_size = block_geometry(qtype)
    row_bytes = data.shape[-1]
    if row_bytes % type_size:
        raise ModelFormatError(
            f"tensor {name!r} of type {qtype.name}: row of {row_bytes} bytes is not a whole "
            f"number of {type_size}-byte blocks"
        )
    blocks = data.reshape(-1, type_size)
    out = np.empty((len(blocks), block_size), dtype=np.float32)
    fn = _DEQUANT[qtype]
    for start in range(0, len(blocks), _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = fn(blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], row_bytes // type_size * block_size)


# ---- activation quantisation (precision="fast") ------------------------------------------
#
# With quantised weights ggml rounds the activations too before each dot product: to 8-bit
# blocks of 32 (Q8_0, for the 32-element weight types) or of 256 (Q8_K, for the K-quants and
# IQ4_XS), to bf16 for BF16 weights and to f16 for F16 weights. ``precision="fast"`` does the
# same; these functions give the rounded activations as float32 values, identically in the
# NumPy reference and the Numba kernels.

ACT_NONE, ACT_Q8_0, ACT_Q8_K, ACT_F16, ACT_BF16 = 0, 1, 2, 3, 4

_ACTIVATION_KIND = {
    QT.F32: ACT_NONE, QT.F16: ACT_F16, QT.BF16: ACT_BF16,
    QT.Q8_0: ACT_Q8_0, QT.Q4_0: ACT_Q8_0, QT.Q4_1: ACT_Q8_0, QT.Q5_0: ACT_Q8_0,
    QT.Q5_1: ACT_Q8_0, QT.IQ4_NL: ACT_Q8_0,
    QT.Q2_K: ACT_Q8_K, QT.Q3_K: ACT_Q8_K, QT.Q4_K: ACT_Q8_K, QT.Q5_K: ACT_Q8_K,
    QT.Q6_K: ACT_Q8_K, QT.IQ4_XS: ACT_Q8_K,
}


def activation_kind(qtype: QT) -> int:
    """How ``precision="fast"`` rounds the activations that meet a weight of this type."""
    return _ACTIVATION_KIND[QT(qtype)]


def round_activations(x: np.ndarray, kind: int) -> np.ndarray:
    """x float32 [T, K] -> the float32 values ggml's activation quantisation represents.

    Q8_0: per 32 values d = amax/127, q = round_half_even(x * 127/amax), value fp16(d) * q.
    Q8_K: per 256 values m = the x of largest |x| (first one), s = -127/m,
          q = min(127, round_half_even(x * s)), value (1/s) * q.
    F16 / BF16: x rounded to nearest even in that format.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == ACT_NONE:
        return x.copy()
    if kind == ACT_F16:
        return x.astype(np.float16).astype(np.float32)
    if kind == ACT_BF16:
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.astype(np.uint32).view(np.float32)
    T, K = x.shape
    if kind == ACT_Q8_0:
        b = x.reshape(T, K // 32, 32)
        amax = np.max(np.abs(b), axis=2, keepdims=True)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        q = np.rint(b * inv)
        d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
        return (d * q).reshape(T, K)
    b = x.reshape(T, K // 256, 256)
    idx = np.argmax(np.abs(b), axis=2)[..., None]
    m = np.take_along_axis(b, idx, axis=2)
    nz = m != 0
    with np.errstate(divide="ignore"):
        s = np.where(nz, np.float32(-127.0) / np.where(nz, m, 1), np.float32(0.0))
        s = s.astype(np.float32)
        d = np.where(nz, np.float32(1.0) / np.where(nz, s, 1), np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.float32(127.0), np.rint(b * s))
    return (d * q).reshape(T, K)
