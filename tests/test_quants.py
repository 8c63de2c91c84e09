"""numba_hybrid.quants.dequantize against hand-computed blocks and, bitwise, against
gguf.quants.dequantize (the reference, used only here)."""

from __future__ import annotations

from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from numba_hybrid.errors import ModelFormatError, UnsupportedModelError
from numba_hybrid.quants import SUPPORTED_TYPES, check_supported, dequantize

DATA_DIR = Path(__file__).parent / "data"

# IQ4_NL / IQ4_XS codebook, as in ggml.
K = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def reference(data: np.ndarray, qtype: QT) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def assert_bitwise_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    assert not diff.any(), (
        f"{int(diff.sum())} of {diff.size} values differ, first at "
        f"{np.argwhere(diff)[0].tolist()}: ours {ours[diff][0]!r}, gguf {ref[diff][0]!r}"
    )


def f16(x: float) -> bytes:
    return np.float16(x).tobytes()


def block(*parts: bytes | list[int]) -> np.ndarray:
    """Concatenate byte fields into one uint8 row (one block)."""
    raw = b"".join(p if isinstance(p, bytes) else bytes(p) for p in parts)
    return np.frombuffer(raw, dtype=np.uint8)[None, :].copy()


# ---- 1. random blocks, bitwise against gguf -------------------------------------------------

# Byte offsets of the f16 scale fields in each block; random bytes there could be NaN/inf.
F16_FIELDS = {
    QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
}
RANDOM_TYPES = [QT.BF16, *F16_FIELDS]


def moderate_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite values over many binades (including f16 subnormals), both signs."""
    return (rng.uniform(-1.0, 1.0, n) * 2.0 ** rng.integers(-20, 8, n)).astype(np.float32)


@pytest.mark.parametrize("qtype", RANDOM_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf_bitwise(qtype):
    rng = np.random.default_rng(1234 + int(qtype))
    rows, n_blocks = 3, 7
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * n_blocks, type_size), dtype=np.uint8)
    if qtype == QT.BF16:
        # bf16 = top half of an f32; keep it finite.
        vals = moderate_floats(rng, rows * n_blocks).view(np.uint32) >> 16
        blocks = vals.astype("<u2").view(np.uint8).reshape(-1, type_size)
    for off in F16_FIELDS.get(qtype, ()):
        scales = moderate_floats(rng, len(blocks)).astype("<f2")
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    data = blocks.reshape(rows, n_blocks * type_size)

    assert_bitwise_equal(dequantize(data, qtype), reference(data, qtype))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.BF16], ids=lambda t: t.name)
def test_leading_dims_kept(qtype):
    # MoE expert tensors are 3-D: (n_expert, rows, bytes_per_row).
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = np.zeros((2, 3, 2 * type_size), dtype=np.uint8)
    assert dequantize(data, qtype).shape == (2, 3, 2 * block_size)


# ---- 2. hand-built blocks -------------------------------------------------------------------

def _z(n: int) -> list[int]:
    return [0] * n


def _zeros_with(n: int, values: dict[int | range, float]) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    for where, v in values.items():
        out[where] = v
    return out


NIB = [j | (15 - j) << 4 for j in range(16)]  # qs[j]: low nibble j, high nibble 15-j

HAND_CASES = {
    # f32 as GGUFReader gives it (typed)
    QT.F32: (np.array([[1.5, -2.25, 0.0]], dtype=np.float32), [1.5, -2.25, 0.0]),
    # f16 as GGUFReader gives it (typed)
    QT.F16: (np.array([[0.5, -3.0, 65504.0]], dtype=np.float16), [0.5, -3.0, 65504.0]),
    # bf16 u16 LE: 0x3FC0 = 1.5, 0xC020 = -2.5, 0x0000 = 0
    QT.BF16: (block([0xC0, 0x3F, 0x20, 0xC0, 0x00, 0x00]), [1.5, -2.5, 0.0]),
    # Q8_0: d=0.5 | qs = -16..15  -> 0.5 * q
    QT.Q8_0: (
        block(f16(0.5), np.arange(-16, 16, dtype=np.int8).tobytes()),
        [0.5 * q for q in range(-16, 16)],
    ),
    # Q4_0: d=2 | qs[j] = j | (15-j)<<4 -> elem j = 2*(j-8), elem j+16 = 2*(15-j-8)
    QT.Q4_0: (
        block(f16(2.0), NIB),
        [2.0 * (j - 8) for j in range(16)] + [2.0 * (7 - j) for j in range(16)],
    ),
    # Q4_1: d=0.5 | m=-1 | same qs -> 0.5*n - 1
    QT.Q4_1: (
        block(f16(0.5), f16(-1.0), NIB),
        [0.5 * j - 1 for j in range(16)] + [0.5 * (15 - j) - 1 for j in range(16)],
    ),
    # Q5_0: d=0.25 | qh = 0x80000001 (5th bit of elems 0 and 31) | qs[j] = j | j<<4
    #   elem j = j (+16 for j=0) - 16; elem 16+j = j (+16 for j=15) - 16
    QT.Q5_0: (
        block(f16(0.25), [0x01, 0x00, 0x00, 0x80], [j * 0x11 for j in range(16)]),
        [0.0] + [0.25 * (j - 16) for j in range(1, 16)]
        + [0.25 * (j - 16) for j in range(15)] + [0.25 * 15],
    ),
    # Q5_1: d=0.5 | m=1 | qh = 0x00010002 (elems 1 and 16) | qs all 0x21 (low 1, high 2)
    #   -> 0.5*n + 1 with n=1 (elems 0..15), 2 (16..31), 17 (elem 1), 18 (elem 16)
    QT.Q5_1: (
        block(f16(0.5), f16(1.0), [0x02, 0x00, 0x01, 0x00], [0x21] * 16),
        [1.5, 9.5] + [1.5] * 14 + [10.0] + [2.0] * 15,
    ),
    # Q2_K: scales[16] (min<<4 | sc) | qs[64] | d=0.5 | dmin=0.25
    #   scales[0]=0x21 (sc1 m2), [1]=0x03 (sc3), [2]=0x10 (m1), [8]=0x01 (sc1)
    #   qs[0]=0xE7 (q=3,1,2,3 at shifts 0,2,4,6), qs[16]=0x02, qs[32]=0x01
    #   elem 0 = .5*1*3 - .25*2 = 1; 1..15 = -0.5; 16 = .5*3*2 = 3; 32..47 = -0.25;
    #   elem 128 (2nd half, shift 0, byte 32, scales[8]) = .5*1*1
    QT.Q2_K: (
        block([0x21, 0x03, 0x10, *_z(5), 0x01, *_z(7)],
              [0xE7, *_z(15), 0x02, *_z(15), 0x01, *_z(31)], f16(0.5), f16(0.25)),
        _zeros_with(256, {0: 1.0, range(1, 16): -0.5, 16: 3.0, range(32, 48): -0.25,
                          128: 0.5}),
    ),
    # Q3_K: hmask[32] | qs[64] | scales[12] | d=0.5. Scale bytes 8..11 = 0xAA give every
    #   scale high bits 2 -> s=32, effective 0, except: s0 = 33 (byte 0 = 0x01),
    #   s9 = 37 (byte 1 high nibble 5), s15 = 0 (byte 11 bits 6,7 cleared -> 0x2A).
    #   Sub-block 0 (elems 0..15): qs[0]=3, hmask[0] bit 0 set -> .5*1*3; rest q=0-4 -> -2.
    #   Sub-block 9 (elems 144..159; qs[48..63] bits 0,1; hmask[16..31] bit 4):
    #   qs[48]=2, hmask[16]=0x10 -> .5*5*2 = 5; rest -> .5*5*-4 = -10.
    #   Sub-block 15 (elems 240..255; qs[48..63] bits 6,7; hmask bit 7): -32 * (q-4):
    #   rest .5*-32*-4 = 64; elem 255: qs[63]=0xC0 (q=3), hmask[31]=0x80 -> .5*-32*3 = -48
    QT.Q3_K: (
        block([0x01, *_z(15), 0x10, *_z(14), 0x80],
              [0x03, *_z(47), 0x02, *_z(14), 0xC0],
              [0x01, 0x50, *_z(6), 0xAA, 0xAA, 0xAA, 0x2A], f16(0.5)),
        _zeros_with(256, {0: 1.5, range(1, 16): -2.0, 144: 5.0, range(145, 160): -10.0,
                          range(240, 255): 64.0, 255: -48.0}),
    ),
    # Q4_K: d=0.5 | dmin=2 | scales[12] | qs[128]
    #   sc0=3 (byte 0), m0=1 (byte 4); sc5=33=0b10_0001: low 1 in byte 9, high 2 in byte 1
    #   bits 6,7; m5=18=0b01_0010: low 2 in byte 9 high nibble, high 1 in byte 5 bits 6,7.
    #   Sub-block 0 = low nibbles of qs[0..31]: qs[0]=7 -> .5*3*7 - 2*1 = 8.5, rest -2.
    #   Sub-block 5 = high nibbles of qs[64..95] (elems 160..191): qs[64]=0xF0 ->
    #   .5*33*15 - 2*18 = 211.5, rest -36.
    QT.Q4_K: (
        block(f16(0.5), f16(2.0), [0x03, 0x80, 0, 0, 0x01, 0x40, 0, 0, 0, 0x21, 0, 0],
              [0x07, *_z(63), 0xF0, *_z(63)]),
        _zeros_with(256, {0: 8.5, range(1, 32): -2.0, 160: 211.5, range(161, 192): -36.0}),
    ),
    # Q5_K: d=1 | dmin=0.5 | scales[12] | qh[32] | qs[128]
    #   sc1=2 (byte 1), m1=4 (byte 5); sc7=1 (byte 11 low nibble).
    #   Sub-block 1 = high nibbles of qs[0..31] + bit 1 of qh: qs[3]=0x90, qh[3]=0x02 ->
    #   n=9+16 -> 1*2*25 - .5*4 = 48 at elem 35, rest of 32..63 -> -2.
    #   Sub-block 7 = high nibbles of qs[96..127] + bit 7 of qh: qh[31]=0x80 -> elem 255 = 16.
    QT.Q5_K: (
        block(f16(1.0), f16(0.5), [0, 0x02, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0x01],
              [0, 0, 0, 0x02, *_z(27), 0x80], [0, 0, 0, 0x90, *_z(124)]),
        _zeros_with(256, {range(32, 64): -2.0, 35: 48.0, 255: 16.0}),
    ),
    # Q6_K: ql[128] | qh[64] | scales:i8[16] | d=0.5; q = 6 bits - 32, so zero bytes give -32.
    #   scales[0]=1: elems 0..15 = ql[l]&15 | (qh[l]&3)<<4: ql[0]=5, qh[0]=2 -> 37-32=5 ->
    #   2.5 at elem 0, rest .5*1*-32 = -16.
    #   scales[3]=-2: elems 48..63 = ql[l+32]&15 | (qh[l]>>2&3)<<4, l=16..31: ql[48]=0x0F,
    #   qh[16]=0x0C -> 63-32=31 -> -31 at elem 48, rest .5*-2*-32 = 32.
    #   scales[14]=4: elems 224..239 (2nd half, ql[96+l]>>4 | (qh[32+l]>>6)<<4): ql[96]=0x80,
    #   qh[32]=0x40 -> 24-32 = -8 -> -16 at elem 224, rest .5*4*-32 = -64.
    QT.Q6_K: (
        block([0x05, *_z(47), 0x0F, *_z(47), 0x80, *_z(31)],
              [0x02, *_z(15), 0x0C, *_z(15), 0x40, *_z(31)],
              np.array([1, 0, 0, -2, *_z(10), 4, 0], dtype=np.int8).tobytes(), f16(0.5)),
        _zeros_with(256, {0: 2.5, range(1, 16): -16.0, 48: -31.0, range(49, 64): 32.0,
                          224: -16.0, range(225, 240): -64.0}),
    ),
    # IQ4_NL: d=0.5 | qs[j] = j | (15-j)<<4 -> elem j = .5*K[j], elem 16+j = .5*K[15-j]
    QT.IQ4_NL: (
        block(f16(0.5), NIB),
        [0.5 * k for k in K] + [0.5 * k for k in reversed(K)],
    ),
    # IQ4_XS: d=0.25 | scales_h:u16 | scales_l[4] | qs[128]. scales_h=0xAAAA would give every
    #   ls high bits 2 -> ls=32, effective 0. ls0=33 (scales_l[0]=0x01); ls3=2 (scales_l[1]
    #   high nibble 2, scales_h bits 6,7 cleared -> 0xAA2A), effective -30.
    #   Sub-block 0 (qs[0..15]): qs[0]=0xF0 -> elem 0 .25*1*K[0] = -31.75, elem 16
    #   .25*K[15] = 28.25, rest K[0] -> -31.75.
    #   Sub-block 3 (qs[48..63], elems 96..127): qs[48]=0x98 -> elem 96 .25*-30*K[8] = -7.5,
    #   elem 112 .25*-30*K[9] = -97.5, rest .25*-30*K[0] = 952.5.
    QT.IQ4_XS: (
        block(f16(0.25), [0x2A, 0xAA], [0x01, 0x20, 0, 0], [0xF0, *_z(47), 0x98, *_z(79)]),
        _zeros_with(256, {range(0, 32): -31.75, 16: 28.25, range(96, 128): 952.5,
                          96: -7.5, 112: -97.5}),
    ),
}


def test_hand_cases_cover_supported_types():
    assert set(HAND_CASES) == set(SUPPORTED_TYPES)


@pytest.mark.parametrize("qtype", list(HAND_CASES), ids=lambda t: t.name)
def test_hand_built_block(qtype):
    data, expected = HAND_CASES[qtype]
    expected = np.asarray(expected, dtype=np.float32)[None, :]
    ours = dequantize(data, qtype)
    np.testing.assert_array_equal(ours, expected)
    assert_bitwise_equal(ours, reference(data, qtype))


# ---- 3. real fixture tensors ----------------------------------------------------------------

FIXTURES = sorted(DATA_DIR.glob("*.gguf"))


@pytest.mark.parametrize(
    "path", FIXTURES or [None], ids=[p.name for p in FIXTURES] or ["no-fixtures"]
)
def test_fixture_tensors_match_gguf_bitwise(path):
    if path is None:
        pytest.fail(f"no GGUF fixtures found: expected {DATA_DIR}/*.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.tensors, f"{path.name} has no tensors"
    for t in reader.tensors:
        qtype = QT(t.tensor_type)
        ours = dequantize(t.data, qtype, name=t.name)
        try:
            assert_bitwise_equal(ours, reference(t.data, qtype))
        except AssertionError as e:
            raise AssertionError(f"{path.name}: {t.name} ({qtype.name}): {e}") from None


# ---- 4. errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype):
    _, type_size = GGML_QUANT_SIZES[qtype]
    data = np.zeros((2, type_size), dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match=rf"{qtype.name}.*blk\.0\.ffn_up\.weight"):
        dequantize(data, qtype, name="blk.0.ffn_up.weight")
    with pytest.raises(UnsupportedModelError, match=qtype.name):
        check_supported(qtype, "t")


@pytest.mark.parametrize(
    ("qtype", "row_bytes"),
    [(QT.Q8_0, 35), (QT.Q4_K, 143), (QT.IQ4_XS, 3 * 136 + 1), (QT.BF16, 5)],
    ids=["Q8_0-35B", "Q4_K-143B", "IQ4_XS-409B", "BF16-5B"],
)
def test_partial_block_raises(qtype, row_bytes):
    data = np.zeros((2, row_bytes), dtype=np.uint8)
    with pytest.raises(ModelFormatError, match=rf"{qtype.name}.*'w'|'w'.*{qtype.name}"):
        dequantize(data, qtype, name="w")
