"""The CPU backend end to end: accuracy against the oracles, bitwise batch invariance,
long-horizon drift against the float64 reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numba_hybrid as nh
from oracle import FIXTURES, deq_reference_name, gguf_path, logits, rel_l2, sequences

N_SLOTS = 8


@functools.lru_cache(maxsize=None)
def load(model: str, wtype: str, device: str = "cpu", precision: str = "exact") -> nh.Model:
    return nh.load(gguf_path(model, wtype), device=device, n_slots=N_SLOTS, n_ctx=640,
                   precision=precision)


def solo(m, ids, slot=0, dtype=np.float32):
    n = len(ids)
    return m.decode(ids, np.arange(n), np.full(n, slot), dtype=dtype)


@pytest.mark.parametrize("model,wtype", FIXTURES, ids=[f"{m}-{t}" for m, t in FIXTURES])
@pytest.mark.parametrize("seq", ["s7", "s40"])
def test_exact_matches_llama_on_dequantized_weights(model, wtype, seq):
    out = solo(load(model, wtype), sequences(model)[seq])
    assert rel_l2(out, logits(model, deq_reference_name(wtype, seq))) <= 1e-4


@pytest.mark.parametrize("seq", ["s7", "s40", "s130"])
def test_exact_f32_matches_hf_float64(seq):
    out = solo(load("qwen35-tiny", "f32"), sequences("qwen35-tiny")[seq])
    assert rel_l2(out, logits("qwen35-tiny", f"hf_f64_{seq}")) <= 1e-4


def _prompts(model: str) -> dict[int, list[int]]:
    """Six sequences of different lengths (1 to 130 tokens) from the fixture texts."""
    s = sequences(model)
    return {0: s["s130"], 1: s["s7"], 2: s["s40"], 3: s["s130"][50:51],
            4: s["s40"][::-1][:23], 5: s["s130"][::-1][:64]}


@functools.lru_cache(maxsize=None)
def _alone(model: str, wtype: str, precision: str):
    """(a) token by token and (b) whole prompt, each sequence alone on slot 0."""
    m = load(model, wtype, precision=precision)
    by_token, whole = {}, {}
    for i, ids in _prompts(model).items():
        whole[i] = solo(m, ids)
        rows = [m.decode([tok], [p], [0]) for p, tok in enumerate(ids)]
        by_token[i] = np.concatenate(rows)
    return by_token, whole


def _mixed(m, prompts: dict[int, list[int]], rng) -> dict[int, np.ndarray]:
    """(c) all together: sequences join at random steps on random free slots (busy slots
    not consecutive), prompts split into random micro-batches, decode tokens of several
    sequences interleaved in one batch in random order; finished sequences leave and
    their slots are reused."""
    waiting = list(rng.permutation(list(prompts)))
    running: dict[int, tuple[int, int]] = {}          # slot -> (sequence, tokens done)
    out = {i: [None] * len(ids) for i, ids in prompts.items()}
    while waiting or running:
        free = [s for s in range(N_SLOTS) if s not in running]
        while waiting and free and (not running or rng.random() < 0.5):
            slot = int(free.pop(int(rng.integers(len(free)))))
            running[slot] = (int(waiting.pop()), 0)
        toks, pos, sid = [], [], []
        for slot, (i, done) in running.items():
            n = min(len(prompts[i]) - done, int(rng.integers(1, 9)) if rng.random() < 0.5 else 1)
            toks += prompts[i][done:done + n]
            pos += range(done, done + n)
            sid += [slot] * n
        order = rng.permutation(len(toks))
        toks, pos, sid = (np.asarray(v)[order] for v in (toks, pos, sid))
        res = m.decode(toks, pos, sid)
        for row, s, p in zip(res, sid, pos):
            out[running[s][0]][p] = row
        for s in set(sid.tolist()):
            i, done = running[s]
            done += int(np.sum(sid == s))
            running[s] = (i, done)
            if done == len(prompts[i]):
                del running[s]
                m.reset(s)
    return {i: np.stack(rows) for i, rows in out.items()}


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("model,wtype", [("qwen35-tiny", "q4_k_m"), ("qwen3next-tiny", "q8_0"),
                                         ("qwen35moe-tiny", "q6_k")])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_batch_invariance_is_bitwise(model, wtype, precision, seed):
    by_token, whole = _alone(model, wtype, precision)
    mixed = _mixed(load(model, wtype, precision=precision), _prompts(model),
                   np.random.default_rng(seed))
    for i in _prompts(model):
        assert np.array_equal(by_token[i], whole[i]), f"sequence {i}: token-by-token != prefill"
        assert np.array_equal(mixed[i], whole[i]), f"sequence {i}: mixed batch != alone"


@pytest.mark.parametrize("model,wtype", [("qwen35moe-tiny", "q6_k"), ("qwen3next-tiny", "q4_k_m"),
                                         ("qwen35moe-tiny", "q8_0")])
def test_compiled_moe_block_gives_the_python_paths_bits(model, wtype):
    """The MoE block as one compiled call (moe.moe_block: experts in panels, or Q8_0 read in
    place) and as the Python sequence of kernel calls it stands for give the same logits,
    bit for bit, on a batch of two sequences (a prompt and a decode step)."""
    m = nh.load(gguf_path(model, wtype), device="cpu", n_slots=2, n_ctx=64, precision="fast")
    assert all("moe_block" in layer for layer in m.backend.layers)
    ids = sequences(model)["s40"]
    tokens = list(ids[:9]) + [int(ids[20])]
    positions = list(range(9)) + [0]
    seqs = [0] * 9 + [1]

    def run():
        for s in (0, 1):
            m.reset(s)
        return m.decode(tokens, positions, seqs)

    compiled = run()
    for layer in m.backend.layers:
        del layer["moe_block"]
    np.testing.assert_array_equal(run(), compiled)


@pytest.mark.parametrize("model,wtype", [("qwen35-tiny", "q4_k_m"), ("qwen35-tiny", "q6_k"),
                                         ("qwen3next-tiny", "q8_0"), ("qwen35moe-tiny", "q8_0")])
def test_compiled_mixer_blocks_give_the_python_paths_bits(model, wtype):
    """The delta-net and attention blocks as one compiled call each (blocks.py: panels of
    one or two types in several products, or Q8_0 rows in one) and as the Python sequence
    of kernel calls they stand for give the same logits and leave the same states, bit for
    bit, on a prompt and a decode step of two sequences, then a step of both."""
    m = nh.load(gguf_path(model, wtype), device="cpu", n_slots=2, n_ctx=64, precision="fast")
    assert all("mixer_block" in layer for layer in m.backend.layers)
    ids = sequences(model)["s40"]

    def run():
        for s in (0, 1):
            m.reset(s)
        first = m.decode(list(ids[:9]) + [int(ids[20])], list(range(9)) + [0], [0] * 9 + [1])
        second = m.decode([int(ids[9]), int(ids[21])], [9, 1], [0, 1])
        return [first, second] + [b.copy() for b in m.state.buffers()]

    compiled = run()
    for layer in m.backend.layers:
        del layer["mixer_block"]
    for a, b in zip(run(), compiled, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fast_matches_reference_with_the_same_activation_rounding():
    """precision="fast" against the float64 reference that rounds activations the same way,
    on the first token of every fixture sequence (36 cases).

    Rounding is discontinuous: now and then a value lands within float32 noise of a rounding
    boundary and the two engines legitimately take different sides; these random tiny
    models amplify one such flip to ~1e-2 (measured: 1 case in 36). A wrong rounding rule
    would put every case near 1e-2, so the check is on the distribution. BF16 is left out
    here (8 significant bits: a flip on most tokens) and checked bit for bit per op in
    test_cpu_kernels, like every other rounding kind."""
    errs = []
    for model, wtype in FIXTURES:
        if wtype == "bf16":
            continue
        ref = load(model, wtype, "reference", "fast")
        cpu = load(model, wtype, "cpu", "fast")
        for seq in ("s7", "s40", "s130"):
            tok = sequences(model)[seq][:1]
            a = ref.decode(tok, [0], [0], dtype=np.float64)
            errs.append(rel_l2(cpu.decode(tok, [0], [0]), a))
    errs = np.array(errs)
    assert np.median(errs) <= 1e-6, errs
    assert np.mean(errs <= 1e-4) >= 0.9, errs


def test_long_decode_stays_close_to_float64_reference():
    """512 single-token decode steps on the CPU vs one float64 reference prefill."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 4093, 512).tolist()
    ref = solo(load("qwen35-tiny", "q8_0", "reference"), ids, dtype=np.float64)
    m = load("qwen35-tiny", "q8_0")
    m.reset(0)
    errs = []
    for p, tok in enumerate(ids):
        row = m.decode([tok], [p], [0])[0]
        errs.append(rel_l2(row, ref[p]))
    assert max(errs) <= 1e-3, (int(np.argmax(errs)), max(errs))


def test_invalid_batch_leaves_state_untouched():
    m = load("qwen35moe-tiny", "q8_0")
    ids = sequences("qwen35moe-tiny")["s40"]
    m.reset(0)
    m.reset(2)
    solo(m, ids[:10], slot=0)
    solo(m, ids[:5], slot=2)
    before = [b.copy() for b in m.state.buffers()]
    pos = m.state.pos.copy()
    with pytest.raises(nh.BatchError):
        # slot 2 continues correctly, slot 0 skips a position: nothing may change.
        m.decode([1, 2, 3], [5, 6, 11], [2, 2, 0])
    assert np.array_equal(pos, m.state.pos)
    assert all(np.array_equal(a, b) for a, b in zip(before, m.state.buffers()))
