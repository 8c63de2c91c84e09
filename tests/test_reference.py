"""The float64 reference forward against independent oracles (HF transformers in float64
and llama.cpp on dequantised weights), and its batching semantics."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import numba_hybrid as nh
from oracle import FIXTURES, MODELS, deq_reference_name, gguf_path, logits, rel_l2, sequences


@functools.lru_cache(maxsize=None)
def load(model: str, wtype: str, n_slots: int = 6) -> nh.Model:
    return nh.load(gguf_path(model, wtype), device="reference", n_slots=n_slots, n_ctx=256,
                   precision="exact")


def solo(m: nh.Model, ids, slot: int = 0) -> np.ndarray:
    """Whole-prompt run of one sequence from position 0: float64 logits [T, V]."""
    n = len(ids)
    return m.decode(ids, np.arange(n), np.full(n, slot), dtype=np.float64)


@pytest.mark.parametrize("seq", ["s7", "s40", "s130"])
def test_f32_matches_hf_float64(seq):
    m = load("qwen35-tiny", "f32")
    ids = sequences("qwen35-tiny")[seq]
    # Only the float32 rounding baked into the file (ssm_a, the +1 of norms) separates them.
    assert rel_l2(solo(m, ids), logits("qwen35-tiny", f"hf_f64_{seq}")) <= 1e-6


@pytest.mark.parametrize("model,wtype", FIXTURES, ids=[f"{m}-{t}" for m, t in FIXTURES])
@pytest.mark.parametrize("seq", ["s7", "s40"])
def test_matches_llama_on_dequantized_weights(model, wtype, seq):
    m = load(model, wtype)
    out = solo(m, sequences(model)[seq])
    assert rel_l2(out, logits(model, deq_reference_name(wtype, seq))) <= 1e-5


@pytest.mark.parametrize("model", ["qwen3next-tiny", "qwen35moe-tiny"])
def test_moe_and_next_match_hf(model):
    """qwen3next/qwen35moe have no f32 file; their q8_0 run must still be the same model
    as HF's (the gap is quantisation damage only, see the fixture README)."""
    out = solo(load(model, "q8_0"), sequences(model)["s40"])
    ref = logits(model, "hf_f64_s40")
    assert rel_l2(out, ref) <= 0.15
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.8


def mixed_stream(m: nh.Model, seqs: dict[int, list[int]], rng) -> dict[int, np.ndarray]:
    """Decode several sequences together: each starts with a prefill of random chunks
    while the others decode one token per step; tokens inside a batch are shuffled."""
    out = {s: np.full((len(ids), m.args.n_vocab), np.nan) for s, ids in seqs.items()}
    done = {s: 0 for s in seqs}
    prompt = {s: max(1, len(ids) // 2) for s, ids in seqs.items()}
    order = list(seqs)
    started: list[int] = []
    while any(done[s] < len(seqs[s]) for s in seqs):
        if order and (not started or done[started[-1]] >= prompt[started[-1]]):
            started.append(order.pop(0))
        toks, pos, sid = [], [], []
        for s in started:
            ids, d = seqs[s], done[s]
            if d >= len(ids):
                continue
            n = int(rng.integers(1, 17)) if d < prompt[s] else 1
            n = min(n, len(ids) - d)
            toks += ids[d:d + n]
            pos += range(d, d + n)
            sid += [s] * n
        shuffle = rng.permutation(len(toks))
        toks, pos, sid = (np.asarray(a)[shuffle] for a in (toks, pos, sid))
        res = m.decode(toks, pos, sid, dtype=np.float64)
        for row, s, p in zip(res, sid, pos):
            out[s][p] = row
        for s in set(sid.tolist()):
            done[s] += int(np.sum(sid == s))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_mixed_batches_equal_solo_runs(model):
    m = load(model, "q8_0")
    names = ["s7", "s40", "s130"]
    alone = {name: solo(m, sequences(model)[name], slot=5) for name in names}
    m.reset(5)
    slots = {0: "s130", 2: "s7", 4: "s40"}  # non-consecutive busy slots
    got = mixed_stream(m, {s: sequences(model)[n] for s, n in slots.items()},
                       np.random.default_rng(1234))
    for s, name in slots.items():
        assert not np.isnan(got[s]).any()
        assert rel_l2(got[s], alone[name]) <= 1e-12, (s, name)
        assert np.max(np.abs(got[s] - alone[name])) <= 1e-10


def test_reused_slot_starts_clean():
    m = load("qwen35-tiny", "q8_0")
    a, b = sequences("qwen35-tiny")["s40"], sequences("qwen35-tiny")["s7"]
    fresh = solo(m, b, slot=3)
    solo(m, a, slot=1)
    # Slot 1 now holds s40; starting s7 there at position 0 must forget it.
    reused = solo(m, b, slot=1)
    assert rel_l2(reused, fresh) <= 1e-12
    # An explicit reset too.
    solo(m, a, slot=1)
    m.reset(1)
    assert m.position(1) == 0
    assert rel_l2(solo(m, b, slot=1), fresh) <= 1e-12


def test_logits_flags_select_rows_in_batch_order():
    m = load("qwen35-tiny", "q8_0")
    ids = sequences("qwen35-tiny")["s7"]
    full = solo(m, ids, slot=0)
    flags = np.array([0, 1, 0, 0, 1, 0, 1], bool)
    rows = m.decode(ids, np.arange(7), np.zeros(7, int), logits=flags, dtype=np.float64)
    assert rows.shape == (3, m.args.n_vocab)
    assert rel_l2(rows, full[flags]) <= 1e-12
    assert m.decode(ids, np.arange(7), np.zeros(7, int)).dtype == np.float32


def test_weights_are_not_copied_at_load():
    """Loading maps the file: tensor data are views of the memory map, and neither the
    mapped pages nor the process's own memory grow by anything like the file size.
    (Parsing the metadata, mostly the vocabulary, costs a few MB of Python objects
    whatever the weights weigh: compare the smallest fixture with the largest.)"""
    small, large = gguf_path("qwen35-tiny", "q2_k"), gguf_path("qwen35-tiny", "f32")
    growth = {}
    for path in (small, large):
        before = _rss_kib()
        m = nh.load(path, device="reference", n_slots=1, n_ctx=64)
        after = _rss_kib()
        growth[path] = {k: (after[k] - before[k]) * 1024 for k in before}
    size = large.stat().st_size
    assert growth[large]["RssFile"] < 0.1 * size, growth
    extra_anon = growth[large]["RssAnon"] - growth[small]["RssAnon"]
    assert extra_anon < 0.1 * size, growth
    t = m.weights.layers[0]["attn_qkv"]
    assert isinstance(t.data.base, np.memmap) or isinstance(t.data, np.memmap)
    assert not t.data.flags.owndata


def _rss_kib() -> dict[str, int]:
    """Resident memory of this process, file-backed and anonymous, in KiB."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssFile", "RssAnon"):
                fields[key] = int(value.split()[0])
    return fields
