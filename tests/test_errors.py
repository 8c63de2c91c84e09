"""Bad input gives one clear error of a documented type, never a crash.

Every damaged or unsupported file must raise exactly one :mod:`numba_hybrid.errors`
exception whose message names the file and the key or tensor at fault. The second half is
a seeded fuzz test that mutates the header, metadata and tensor infos of the smallest
fixture (the bytes before the tensor data) and requires that loading either succeeds or
raises a NumbaHybridError -- no other exception, no hang, no giant allocation.

Broken files are made in two ways: byte patches of a fixture (magic, version, counts,
truncation), and :func:`rewrite_gguf`, which copies a fixture through ``gguf.GGUFWriter``
with metadata or tensors changed (architecture, a key dropped or retyped, a tensor removed,
reshaped, of another type, or added).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import struct
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import numba_hybrid as nh
from numba_hybrid.errors import (GGUFFormatError, ModelFormatError, NumbaHybridError,
                                 UnsupportedModelError)
from oracle import gguf_path

FIXTURE = gguf_path("qwen35-tiny", "q2_k")  # the smallest fixture (2 MB)


def load(path, **kw):
    kw = {"device": "reference", "n_slots": 1, "n_ctx": 8, **kw}
    return nh.load(path, **kw)


def raises(exc_type, path, *names, **kw) -> NumbaHybridError:
    """Loading ``path`` raises exactly ``exc_type``, whose message names the file and every
    string in ``names``."""
    with pytest.raises(NumbaHybridError) as info:
        load(path, **kw)
    err = info.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err}"
    msg = str(err)
    assert "\n" not in msg, msg
    for name in (str(path), *names):
        assert name in msg, f"{name!r} not in {msg!r}"
    return err


# ---- writing modified GGUF files ------------------------------------------------------------

def rewrite_gguf(src: Path, dst: Path, *, arch: str | None = None,
                 set_kv: dict | None = None, drop_kv=(), drop_tensors=(),
                 replace_tensors: dict | None = None, add_tensors: dict | None = None) -> Path:
    """Copy the GGUF ``src`` to ``dst`` through GGUFWriter, changing what is asked:

    arch            new ``general.architecture`` (the other keys keep their prefix)
    set_kv          {key: (value, GGUFValueType[, sub_type])}: add or replace a key
    drop_kv         keys to leave out
    drop_tensors    tensors to leave out
    replace_tensors {name: (array, raw_dtype or None)}: new data/type/shape for a tensor
    add_tensors     {name: (array, raw_dtype or None)}: tensors appended at the end

    Arrays follow GGUFWriter's convention: typed (float32...) data in numpy order, or
    quantised bytes ``uint8[rows, bytes_per_row]`` with ``raw_dtype`` set.
    """
    set_kv, replace_tensors = dict(set_kv or {}), dict(replace_tensors or {})
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch or reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_kv:
            continue
        if name in set_kv:
            writer.add_key_value(name, *set_kv.pop(name))
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    for name, spec in set_kv.items():
        writer.add_key_value(name, *spec)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        data, qtype = replace_tensors.pop(t.name, (np.asarray(t.data), t.tensor_type))
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    for name, (data, qtype) in {**replace_tensors, **(add_tensors or {})}.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def patched(tmp_path: Path, name: str, patches=(), cut: int | None = None,
            src: Path = FIXTURE) -> Path:
    """A copy of ``src`` with ``patches`` [(offset, bytes)] applied, cut to ``cut`` bytes."""
    data = bytearray(src.read_bytes())
    for offset, raw in patches:
        data[offset:offset + len(raw)] = raw
    path = tmp_path / name
    path.write_bytes(bytes(data[:cut]))
    return path


@dataclass(frozen=True)
class IntField:
    """An integer of the file's structure: where it is and what it means."""

    offset: int
    size: int     # 4 or 8 bytes
    what: str
    value: int


def int_fields(path: Path) -> tuple[list[IntField], int, int]:
    """Every integer of the header, metadata and tensor infos (counts, lengths, types,
    dimensions, offsets, scalar values), found by walking GGUFReader's field parts, which
    lie back to back in the file. Also returns where the tensor infos start and the
    tensor data offset."""
    reader = GGUFReader(path)
    out: list[IntField] = []
    fields = [(name, f) for name, f in reader.fields.items()]
    fields += [(f"tensor {t.name}", t.field) for t in reader.tensors]
    for name, field in fields:
        pos = field.offset
        for k, part in enumerate(field.parts):
            if part.dtype.kind in "iu" and part.dtype.itemsize in (4, 8):
                for j, v in enumerate(part.tolist()):
                    out.append(IntField(pos + j * part.itemsize, part.itemsize,
                                        f"{name}[part {k}]", int(v)))
            pos += part.nbytes
    first_ti = min(t.field.offset for t in reader.tensors)
    return out, first_ti, reader.data_offset


def field_offset(path: Path, key: str, part: int) -> int:
    """Byte offset of part ``part`` of metadata field ``key`` (or of tensor ``key``'s info)."""
    reader = GGUFReader(path)
    field = reader.fields.get(key) or next(t.field for t in reader.tensors if t.name == key)
    return field.offset + sum(p.nbytes for p in field.parts[:part])


# ---- the file itself ------------------------------------------------------------------------

def test_missing_file(tmp_path):
    raises(GGUFFormatError, tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path):
    raises(GGUFFormatError, tmp_path, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    raises(GGUFFormatError, path, "too short")


def test_text_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("These are not the weights you are looking for.\n" * 20)
    raises(GGUFFormatError, path, "not a GGUF file")


def test_wrong_magic(tmp_path):
    raises(GGUFFormatError, patched(tmp_path, "magic.gguf", [(0, b"GGML")]), "magic")


@pytest.mark.parametrize("version", [0, 1, 4, 99, 2**32 - 1])
def test_unsupported_version(tmp_path, version):
    path = patched(tmp_path, "v.gguf", [(4, struct.pack("<I", version))])
    raises(GGUFFormatError, path, f"unsupported GGUF version {version}")


# The fixture's structure: its integer fields, where the tensor infos start, where the
# tensor data start.
FIXTURE_INTS, TI_START, DATA_OFFSET = int_fields(FIXTURE)


def _cut_points() -> dict[str, int]:
    ti_start, data_offset = TI_START, DATA_OFFSET
    reader = GGUFReader(FIXTURE)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    last = max(reader.tensors, key=lambda t: t.data_offset)
    return {
        "header-magic": 6,
        "header-counts": 20,
        "metadata-first-key": 30,
        "metadata-tokens-array": tokens.offset + 5000,
        "metadata-last-value": ti_start - 3,
        "tensor-infos-start": ti_start + 4,
        "tensor-infos-middle": (ti_start + data_offset) // 2,
        "tensor-infos-end": data_offset - 20,
        "tensor-data-start": data_offset + 100,
        "tensor-data-middle": (data_offset + FIXTURE.stat().st_size) // 2,
        "tensor-data-last": last.data_offset + 10,
        "one-byte-short": FIXTURE.stat().st_size - 1,
    }


CUTS = _cut_points()


@pytest.mark.parametrize("where", list(CUTS))
def test_truncated(tmp_path, where):
    path = patched(tmp_path, "cut.gguf", cut=CUTS[where])
    err = raises(GGUFFormatError, path)
    msg = str(err)
    assert "truncated" in msg or "too short" in msg or "past the end of the file" in msg, msg
    if where.startswith("tensor-data"):
        assert "tensor '" in msg  # names the tensor whose data is cut


def test_tensor_data_past_end(tmp_path):
    """A tensor-info offset pointing beyond the file."""
    reader = GGUFReader(FIXTURE)
    t = reader.tensors[len(reader.tensors) // 2]
    at = field_offset(FIXTURE, t.name, 5)
    new = int(reader.tensors[-1].data_offset - reader.data_offset) + (1 << 20)
    path = patched(tmp_path, "past.gguf", [(at, struct.pack("<Q", new))])
    raises(GGUFFormatError, path, f"tensor {t.name!r}", "past the end of the file")


def test_misaligned_tensor_offset(tmp_path):
    reader = GGUFReader(FIXTURE)
    t = reader.tensors[3]
    at = field_offset(FIXTURE, t.name, 5)
    off = int(t.data_offset - reader.data_offset)
    path = patched(tmp_path, "align.gguf", [(at, struct.pack("<Q", off + 4))])
    raises(GGUFFormatError, path, f"tensor {t.name!r}", "alignment")


def test_duplicate_tensor_name(tmp_path):
    """blk.1.ssm_a renamed blk.0.ssm_a in place (same length)."""
    at = field_offset(FIXTURE, "blk.1.ssm_a", 1) + len("blk.")
    raises(GGUFFormatError, patched(tmp_path, "dup.gguf", [(at, b"0")]),
           "'blk.0.ssm_a' appears twice")


def test_duplicate_key(tmp_path):
    """tokenizer.ggml.add_eos_token renamed tokenizer.ggml.add_bos_token in place."""
    at = field_offset(FIXTURE, "tokenizer.ggml.add_eos_token", 1) + len("tokenizer.ggml.add_")
    raises(GGUFFormatError, patched(tmp_path, "dupkey.gguf", [(at, b"bos")]),
           "'tokenizer.ggml.add_bos_token' appears twice")


@pytest.mark.parametrize("key,part", [
    ("tokenizer.ggml.tokens", 4),       # array of strings: length
    ("tokenizer.ggml.token_type", 4),   # array of int32: length
    ("qwen35.rope.dimension_sections", 4),
    ("general.name", 3),                # a string's length
    ("general.name", 0),                # a key's length
])
@pytest.mark.parametrize("value", [2**60, 2**64 - 1, 2**31])
def test_huge_count_fails_fast(tmp_path, key, part, value):
    """GGUFReader would loop over 2**60 elements past the end of the file: the counts
    are checked against the file size first."""
    path = patched(tmp_path, "huge.gguf", [(field_offset(FIXTURE, key, part),
                                            struct.pack("<Q", value))])
    t0 = time.perf_counter()
    raises(GGUFFormatError, path)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("part,value,what", [(1, 2**62, "tensor count"),
                                             (2, 2**62, "key/value count"),
                                             (1, 2**64 - 1, "tensor count")])
def test_huge_header_counts(tmp_path, part, value, what):
    path = patched(tmp_path, "counts.gguf", [(8 * part, struct.pack("<Q", value))])
    raises(GGUFFormatError, path, what)


def test_bad_value_type(tmp_path):
    at = field_offset(FIXTURE, "qwen35.block_count", 2)
    raises(GGUFFormatError, patched(tmp_path, "vtype.gguf", [(at, struct.pack("<I", 77))]),
           "'qwen35.block_count'", "unknown value type 77")


def test_unknown_tensor_type_id(tmp_path):
    at = field_offset(FIXTURE, "blk.0.ssm_a", 4)
    raises(GGUFFormatError, patched(tmp_path, "ttype.gguf", [(at, struct.pack("<I", 250))]),
           "'blk.0.ssm_a'", "250")


# ---- well-formed files this engine cannot or must not run ----------------------------------

def test_unsupported_architecture(tmp_path):
    path = rewrite_gguf(FIXTURE, tmp_path / "llama.gguf", arch="llama")
    err = raises(UnsupportedModelError, path, "'llama'")
    assert "qwen35" in str(err)  # says what is supported


@pytest.mark.parametrize("key", ["qwen35.ssm.state_size", "qwen35.block_count",
                                 "qwen35.embedding_length", "qwen35.ssm.conv_kernel",
                                 "qwen35.attention.layer_norm_rms_epsilon"])
def test_missing_required_key(tmp_path, key):
    path = rewrite_gguf(FIXTURE, tmp_path / "nokey.gguf", drop_kv=[key])
    raises(ModelFormatError, path, repr(key), "missing")


def test_missing_architecture_key(tmp_path):
    path = rewrite_gguf(FIXTURE, tmp_path / "noarch.gguf")
    data = bytearray(path.read_bytes())
    # Rename the key in place: general.architecture -> general.architectur_
    at = data.index(b"general.architecture") + len("general.architectur")
    data[at:at + 1] = b"_"
    path.write_bytes(bytes(data))
    raises(ModelFormatError, path, "'general.architecture'", "missing")


@pytest.mark.parametrize("key,value,vtype,must", [
    ("qwen35.block_count", "4", GGUFValueType.STRING, "integer"),
    ("qwen35.ssm.state_size", 64.0, GGUFValueType.FLOAT32, "integer"),
    ("qwen35.rope.freq_base", "1e7", GGUFValueType.STRING, "number"),
    ("general.architecture", 35, GGUFValueType.UINT32, "string"),
])
def test_key_of_wrong_type(tmp_path, key, value, vtype, must):
    path = rewrite_gguf(FIXTURE, tmp_path / "type.gguf", set_kv={key: (value, vtype)})
    raises(ModelFormatError, path, repr(key), must)


@pytest.mark.parametrize("key,value,sub", [
    ("qwen35.rope.dimension_sections", ["3", "3", "2", "0"], GGUFValueType.STRING),
    ("qwen35.rope.dimension_sections", [3.0, 3.0, 2.0, float("nan")], GGUFValueType.FLOAT32),
])
def test_array_of_wrong_element_type(tmp_path, key, value, sub):
    path = rewrite_gguf(FIXTURE, tmp_path / "arr.gguf",
                        set_kv={key: (value, GGUFValueType.ARRAY, sub)})
    raises(ModelFormatError, path, repr(key), "array of integers")


@pytest.mark.parametrize("key,value,sub,words", [
    ("tokenizer.ggml.token_type", ["1"] * 4096, GGUFValueType.STRING,
     "token_type must be an array of integers"),
    # A merge of two tokens that are not in the vocabulary: the tokenizers library raises
    # a bare Exception for it.
    ("tokenizer.ggml.merges", ["zzzq qqqz"], GGUFValueType.STRING, "tokenizer.ggml.merges"),
    ("tokenizer.ggml.merges", [1, 2, 3], GGUFValueType.INT32, "tokenizer.ggml.merges"),
])
def test_broken_tokenizer_metadata(tmp_path, key, value, sub, words):
    """Tokenizer errors name the key (the tokenizer does not know the file's path)."""
    path = rewrite_gguf(FIXTURE, tmp_path / "tok.gguf",
                        set_kv={key: (value, GGUFValueType.ARRAY, sub)})
    with pytest.raises(ModelFormatError) as info:
        load(path)
    assert words in str(info.value)


@pytest.mark.parametrize("key,value,tensor", [
    # Dk 64 -> 32: the conv channels of every recurrent layer change.
    ("qwen35.ssm.state_size", 32, "blk.0.attn_qkv.weight"),
    ("qwen35.embedding_length", 320, "token_embd.weight"),
    ("qwen35.feed_forward_length", 1024, "blk.0.ffn_gate.weight"),
])
def test_hyper_parameter_disagrees_with_tensors(tmp_path, key, value, tensor):
    path = rewrite_gguf(FIXTURE, tmp_path / "hp.gguf",
                        set_kv={key: (value, GGUFValueType.UINT32)})
    raises(ModelFormatError, path, repr(tensor), "shape")


@pytest.mark.parametrize("key,value,what", [
    ("qwen35.ssm.time_step_rank", 3, "ssm.inner_size"),
    ("qwen35.attention.head_count_kv", 3, "KV heads"),
    ("qwen35.rope.dimension_count", 7, "rope.dimension_count"),
    ("qwen35.attention.layer_norm_rms_epsilon", -1.0, "layer_norm_rms_epsilon"),
    ("qwen35.block_count", 0, "blocks"),
])
def test_inconsistent_hyper_parameters(tmp_path, key, value, what):
    vtype = GGUFValueType.FLOAT32 if isinstance(value, float) else GGUFValueType.INT32
    path = rewrite_gguf(FIXTURE, tmp_path / "hp.gguf", set_kv={key: (value, vtype)})
    raises(ModelFormatError, path, what)


def test_tensor_of_wrong_shape(tmp_path):
    name = "blk.2.ssm_norm.weight"  # (Dv,) = (64,)
    path = rewrite_gguf(FIXTURE, tmp_path / "shape.gguf",
                        replace_tensors={name: (np.ones(32, np.float32), None)})
    err = raises(ModelFormatError, path, repr(name))
    assert "[32]" in str(err) and "[64]" in str(err)


@pytest.mark.parametrize("name", ["blk.1.ssm_out.weight", "output_norm.weight",
                                  "blk.3.attn_k_norm.weight", "token_embd.weight"])
def test_missing_tensor(tmp_path, name):
    path = rewrite_gguf(FIXTURE, tmp_path / "notensor.gguf", drop_tensors=[name])
    raises(ModelFormatError, path, repr(name), "missing")


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.IQ1_S, QT.TQ1_0])
def test_tensor_of_unsupported_type(tmp_path, qtype):
    """blk.0.attn_gate.weight ([256, 256]) rewritten as raw blocks of another type."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (256, 256 // block * size), np.uint8)
    name = "blk.0.attn_gate.weight"
    path = rewrite_gguf(FIXTURE, tmp_path / "iq.gguf", replace_tensors={name: (raw, qtype)})
    assert GGUFReader(path).tensors[2].tensor_type == qtype  # the writer kept the type
    err = raises(UnsupportedModelError, path, repr(name), qtype.name)
    assert "Q8_0" in str(err)  # lists what is supported


def test_unused_tensor_is_reported(tmp_path):
    extra = {"blk.0.extra_scale.weight": (np.ones(8, np.float32), None),
             "zz_mystery": (np.zeros((2, 32), np.float32), None)}
    path = rewrite_gguf(FIXTURE, tmp_path / "extra.gguf", add_tensors=extra)
    m = load(path)
    assert m.weights.unused == sorted(extra)
    base = load(FIXTURE)
    assert base.weights.unused == []
    out = m.decode([1, 2, 3], [0, 1, 2], [0, 0, 0])
    np.testing.assert_array_equal(out, base.decode([1, 2, 3], [0, 1, 2], [0, 0, 0]))


def test_rewrite_helper_is_faithful(tmp_path):
    """An unmodified rewrite loads and computes exactly like the fixture."""
    path = rewrite_gguf(FIXTURE, tmp_path / "same.gguf")
    a, b = load(path), load(FIXTURE)
    assert a.args == b.args
    np.testing.assert_array_equal(a.decode([5, 6], [0, 1], [0, 0]),
                                  b.decode([5, 6], [0, 1], [0, 0]))


def test_state_too_large_for_memory():
    with pytest.raises(NumbaHybridError) as info:
        load(FIXTURE, n_slots=4, n_ctx=2**40)
    assert "n_ctx" in str(info.value) and "GiB" in str(info.value)


# ---- fuzzing the bytes before the tensor data -----------------------------------------------

FUZZ_SEED = 20240611
FUZZ_CASES = 1200
CASE_BUDGET_S = 10.0       # a single load+decode taking longer counts as a hang
FUZZ_TIMEOUT_S = 600       # the whole fuzz run (about 20 s on 2 busy cores)
MEMORY_HEADROOM = 3 << 30  # address space a worker may add beyond what it has at start


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case; a BaseException so no `except Exception` eats it."""


@dataclass(frozen=True)
class Mutation:
    case: int
    kind: str
    patches: tuple[tuple[int, bytes], ...] = ()
    cut: int | None = None
    note: str = ""

    def touches(self, lo: int, hi: int) -> bool:
        return any(off < hi and off + len(raw) > lo for off, raw in self.patches)

    def __str__(self) -> str:
        where = f"cut at {self.cut}" if self.cut is not None else ", ".join(
            f"@{off}={raw.hex()}" for off, raw in self.patches)
        return f"case {self.case} (seed {FUZZ_SEED}) {self.kind} {where} {self.note}".strip()


def _interesting_ints(size: int, value: int, rng, file_size: int) -> int:
    bits = 8 * size
    top = (1 << bits) - 1
    choices = [0, 1, top, top >> 1, 1 << (bits - 1), value + 1, max(value - 1, 0),
               value * 2, value ^ (1 << int(rng.integers(bits))),
               file_size, file_size // 2, int(rng.integers(0, 1 << 31)),
               (1 << bits) - int(rng.integers(1, 1000))]  # negative as two's complement
    if bits == 64:
        choices += [1 << 32, 1 << 60, (1 << 32) - 1]
    return int(choices[int(rng.integers(len(choices)))]) & top


def make_mutations(path: Path, seed: int, n: int) -> list[Mutation]:
    """``n`` reproducible mutations of the bytes before the tensor data of ``path``:
    35% single-byte flips, 20% random multi-byte overwrites, 30% integer fields found by
    parsing (counts, lengths, types, dims, offsets, values) set to huge/negative/off-by-one
    values, 15% truncations. Half the random positions are drawn from the whole region
    (mostly vocabulary strings), half from the non-vocabulary structure."""
    fields, _, data_offset = int_fields(path)
    file_size = path.stat().st_size
    reader = GGUFReader(path)
    tok = [reader.fields[k] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                      "tokenizer.ggml.merges")]
    vocab_lo, vocab_hi = tok[0].offset, tok[-1].offset + sum(p.nbytes for p in tok[-1].parts)

    def in_vocab_payload(f: IntField) -> bool:  # the 12k per-element lengths and values
        return vocab_lo + 64 < f.offset < vocab_hi - 8

    structural = [f for f in fields if not in_vocab_payload(f)]
    vocab_fields = [f for f in fields if in_vocab_payload(f)]
    rng = np.random.default_rng(seed)

    def position() -> int:
        if rng.random() < 0.5:  # anywhere: mostly inside vocabulary strings
            return int(rng.integers(0, data_offset))
        if rng.random() < 1 / 3:  # header and hyper-parameters
            return int(rng.integers(0, vocab_lo + 64))
        return int(rng.integers(vocab_hi - 8, data_offset))  # last keys and tensor infos

    out = []
    for case in range(n):
        r = rng.random()
        if r < 0.35:
            at = position()
            flip = int(rng.integers(1, 256)) if rng.random() < 0.5 else 1 << int(rng.integers(8))
            # The patch holds the xor mask; the worker applies original ^ mask.
            out.append(Mutation(case, "flip", ((at, bytes([flip])),), note="(xor mask)"))
        elif r < 0.55:
            at = position()
            length = int(rng.integers(2, 17))
            raw = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
            out.append(Mutation(case, "overwrite", ((at, raw),)))
        elif r < 0.85:
            pool = vocab_fields if rng.random() < 0.1 else structural
            f = pool[int(rng.integers(len(pool)))]
            v = _interesting_ints(f.size, f.value, rng, file_size)
            fmt = "<I" if f.size == 4 else "<Q"
            out.append(Mutation(case, "int", ((f.offset, struct.pack(fmt, v)),),
                                note=f"{f.what}: {f.value} -> {v}"))
        else:
            cut = int(rng.integers(0, data_offset + 64)) if rng.random() < 0.8 \
                else int(rng.integers(data_offset, file_size))
            out.append(Mutation(case, "truncate", cut=cut))
    return out


def _on_alarm(signum, frame):
    raise CaseTimeout()


def _proc_status(field: str) -> int:
    """A size from /proc/self/status in bytes: VmSize (address space), VmHWM (peak
    resident memory of this process image; unlike ru_maxrss it is not inherited across
    fork+exec from the pytest process)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_fuzz_cases(src: str, workdir: str, mutations: list[Mutation]) -> dict:
    """Run mutations in this process; returns failures (strings) and outcome counts.

    Patches are applied to one scratch copy and undone after each case (xor flips are
    undone by a second xor); truncations write a prefix file. The address space is capped
    so that a loader trying to allocate gigabytes fails loudly (the MemoryError then shows
    up in the exception chain and is reported), and each case runs under an alarm."""
    original = Path(src).read_bytes()
    scratch = Path(workdir) / f"fuzz-{os.getpid()}.gguf"
    scratch.write_bytes(original)
    cut_path = Path(workdir) / f"fuzz-{os.getpid()}-cut.gguf"
    limit = _proc_status("VmSize") + MEMORY_HEADROOM
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, old_limit[1]))
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    failures: list[str] = []
    outcomes: dict[str, int] = {}
    slowest = (0.0, "")
    try:
        with open(scratch, "r+b") as fh:
            for m in mutations:
                if m.cut is not None:
                    cut_path.write_bytes(original[:m.cut])
                    path = cut_path
                else:
                    for off, raw in m.patches:
                        fh.seek(off)
                        if m.kind == "flip":
                            raw = bytes([original[off] ^ raw[0]])
                        fh.write(raw)
                    fh.flush()
                    path = scratch
                t0 = time.perf_counter()
                signal.setitimer(signal.ITIMER_REAL, CASE_BUDGET_S)
                try:
                    outcome = _one_case(path, m)
                except CaseTimeout:
                    outcome = None
                    failures.append(f"{m}: took more than {CASE_BUDGET_S} s")
                except BaseException as exc:  # noqa: BLE001 -- this is what we hunt
                    outcome = None
                    failures.append(f"{m}: {type(exc).__name__}: {exc}\n"
                                    + "".join(traceback.format_exception(exc)[-6:]))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                dt = time.perf_counter() - t0
                slowest = max(slowest, (dt, str(m)))
                if isinstance(outcome, str) and outcome.startswith("FAIL"):
                    failures.append(f"{m}: {outcome}")
                elif outcome:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if m.cut is None:
                    for off, raw in m.patches:
                        fh.seek(off)
                        fh.write(original[off:off + len(raw)])
                    fh.flush()
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        scratch.unlink(missing_ok=True)
        cut_path.unlink(missing_ok=True)
    peak = _proc_status("VmHWM")
    return {"failures": failures, "outcomes": outcomes, "slowest": slowest, "peak_rss": peak}


def _one_case(path: Path, m: Mutation) -> str:
    """Load and, if that works, decode two tokens. Returns an outcome label, or a string
    starting with FAIL for a wrong-but-not-raising outcome."""
    try:
        model = load(path)
    except NumbaHybridError as exc:
        if _memory_error_in_chain(exc):
            return f"FAIL: a MemoryError was wrapped: {exc}"
        return type(exc).__name__
    try:
        nbytes = model.state.nbytes()
        if nbytes > 1 << 30:
            return f"FAIL: the state of 1 slot x 8 positions takes {nbytes} bytes"
        try:
            out = model.decode([1, 2], [0, 1], [0, 0])
        except NumbaHybridError as exc:
            return f"decode {type(exc).__name__}"
        if out.shape != (2, model.args.n_vocab):
            return f"FAIL: logits of shape {out.shape}"
        if not np.all(np.isfinite(out)):
            # Only a changed tensor info (type or offset: other bytes read as weights) may
            # legitimately produce NaN/inf; a metadata change must not.
            if m.touches(TI_START, DATA_OFFSET):
                return "loaded, garbage weights"
            return "FAIL: non-finite logits"
        return "loaded"
    finally:
        del model


def _memory_error_in_chain(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, MemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _worker(args):
    return run_fuzz_cases(*args)


def test_fuzz_header_metadata_tensor_infos(tmp_path):
    """FUZZ_CASES seeded mutations of everything before the tensor data of the smallest
    fixture: each must load or raise a NumbaHybridError (no other exception, no hang, no
    huge allocation); loaded models must decode to finite logits or raise one too.
    The cases are split over two worker processes (fresh interpreters: the address-space
    cap and the alarm stay out of the pytest process).

    To replay a failing case N in a debugger (from tests/)::

        import test_errors as t
        m = t.make_mutations(t.FIXTURE, t.FUZZ_SEED, N + 1)[N]
        t.run_fuzz_cases(str(t.FIXTURE), "/tmp", [m])
    """
    mutations = make_mutations(FIXTURE, FUZZ_SEED, FUZZ_CASES)
    n_workers = 2
    jobs = [(str(FIXTURE), str(tmp_path), mutations[i::n_workers]) for i in range(n_workers)]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(n_workers) as pool:
        # A worker stuck where the per-case alarm cannot reach (inside C code) still
        # fails the test instead of hanging it.
        results = pool.map_async(_worker, jobs).get(timeout=FUZZ_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    failures = [f for r in results for f in r["failures"]]
    outcomes: dict[str, int] = {}
    for r in results:
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    slowest = max(r["slowest"] for r in results)
    print(f"\nfuzz: {FUZZ_CASES} cases in {elapsed:.1f} s; outcomes {outcomes}; "
          f"slowest {slowest[0]:.2f} s ({slowest[1]}); "
          f"peak RSS {max(r['peak_rss'] for r in results) / 2**20:.0f} MiB")
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:20])
    assert sum(outcomes.values()) == FUZZ_CASES
    assert max(r["peak_rss"] for r in results) < 1 << 30
