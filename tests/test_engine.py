"""The generation engine: sampling, stops, UTF-8 streaming, continuous batching,
seeded reproducibility alone and beside other sequences, perplexity's invariance to the
batch size, and the concurrency check (including proof that it catches a difference).

Model-level tests run the CPU backend on the tiny random-weight fixtures: their text is
gibberish, but deterministic, which is all these properties need.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

import numba_hybrid as nh
from numba_hybrid.engine import (Engine, InvalidParameterError, Sampler, SamplingParams,
                                 Scheduler, Sequence, StopCriteria)
from numba_hybrid.engine.parallel import (CheckRow, builtin_prompts, compare_traces,
                                          parallel_check)
from numba_hybrid.engine.perplexity import perplexity, plan_perplexity, token_nll
from numba_hybrid.engine.sampler import candidates
from numba_hybrid.errors import NumbaHybridError
from oracle import DATA, MODELS, gguf_path, sequences

PROMPTS = ["Once upon a time", "def main():\n    print(", "東京は", "The capital of France is"]


@functools.lru_cache(maxsize=None)
def load(model: str = "qwen35-tiny", n_slots: int = 4, n_ctx: int = 256) -> nh.Model:
    return nh.load(gguf_path(model, "q8_0"), device="cpu", n_slots=n_slots, n_ctx=n_ctx)


def assert_slots_empty(m: nh.Model) -> None:
    assert [m.position(s) for s in range(m.n_slots)] == [0] * m.n_slots


# ---- SamplingParams ----------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("temperature", -0.1, "temperature must be at least 0"),
    ("temperature", float("nan"), "temperature must be finite"),
    ("top_k", -1, "top_k must be at least 0"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_p", 0.0, "top_p must be greater than 0"),
    ("top_p", 1.5, "top_p must be at most 1"),
    ("min_p", -0.01, "min_p must be at least 0"),
    ("min_p", 2, "min_p must be at most 1"),
    ("repeat_penalty", 0, "repeat_penalty must be greater than 0"),
    ("repeat_last_n", -2, "repeat_last_n must be at least -1"),
    ("presence_penalty", float("inf"), "presence_penalty must be finite"),
    ("frequency_penalty", "1", "frequency_penalty must be a number"),
    ("seed", -1, "seed must be in 0.."),
    ("seed", True, "seed must be an integer"),
])
def test_sampling_params_validate(field, value, words):
    with pytest.raises(InvalidParameterError, match=words) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError) and isinstance(info.value, NumbaHybridError)


def test_sampling_params_defaults_are_llama_cpp():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n) == \
        (0.8, 40, 0.95, 0.05, 1.0, 64)
    assert SamplingParams.greedy().is_greedy and not p.is_greedy
    assert nh.SamplingParams is SamplingParams


# ---- Sampler on crafted logits -----------------------------------------------------------

def test_greedy_takes_the_argmax_and_the_lowest_id_on_a_tie():
    s = Sampler(SamplingParams.greedy())
    assert s.sample(np.array([0.0, 3.0, 1.0, 3.0])) == 1
    assert s.sample(np.array([5.0, 3.0], dtype=np.float32)) == 0


def test_filters_in_llama_cpp_order():
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    x = np.log(probs)
    ids, p = candidates(x, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    assert list(ids) == [1, 2, 3, 0] and np.allclose(p, probs[ids])
    # top-p keeps the shortest prefix reaching p: 0.5 + 0.3 >= 0.75.
    ids, p = candidates(x, SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0))
    assert list(ids) == [1, 2] and np.allclose(p, [0.5 / 0.8, 0.3 / 0.8])
    ids, _ = candidates(x, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0))
    assert list(ids) == [1, 2]
    # min-p: at least 0.35 x 0.5 = 0.175, relative to the best token, before temperature.
    ids, _ = candidates(x, SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.35))
    assert list(ids) == [1, 2]
    # Temperature scales what is left.
    _, p = candidates(x, SamplingParams(temperature=0.5, top_k=2, top_p=1.0, min_p=0.0))
    assert np.allclose(p, np.array([0.25, 0.09]) / 0.34)


def test_ties_are_ordered_by_token_id_at_the_top_k_cut():
    x = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    ids, _ = candidates(x, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0))
    assert list(ids) == [1, 2]


def test_draws_follow_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                np.random.default_rng(0))
    draws = np.array([s.sample(np.log(probs)) for _ in range(20000)])
    freq = np.bincount(draws, minlength=3) / draws.size
    assert np.allclose(freq, probs, atol=0.015), freq


def test_same_generator_same_tokens():
    x = np.random.default_rng(5).normal(size=300)
    p = SamplingParams(temperature=1.3, top_k=50, top_p=0.9, min_p=0.01)
    a = [Sampler(p, np.random.default_rng([7, 0])).sample(x) for _ in range(3)]
    s1, s2 = Sampler(p, np.random.default_rng([7, 0])), Sampler(p, np.random.default_rng([7, 0]))
    assert [s1.sample(x) for _ in range(50)] == [s2.sample(x) for _ in range(50)]
    assert len(set(a)) == 1


def test_penalties():
    x = np.array([2.0, -2.0, 1.0, 0.5])
    hist = [0, 1, 0, 3]
    s = Sampler(SamplingParams.greedy(repeat_penalty=4.0))
    assert s.sample(x, hist) == 2  # 2/4 = 0.5 < 1.0
    out = x.copy()
    from numba_hybrid.engine.sampler import apply_penalties

    apply_penalties(out, np.array(hist), SamplingParams(repeat_penalty=2.0,
                                                        presence_penalty=0.25,
                                                        frequency_penalty=0.1))
    assert np.allclose(out, [2.0 / 2 - 0.2 - 0.25, -2.0 * 2 - 0.1 - 0.25, 1.0,
                             0.5 / 2 - 0.1 - 0.25])
    # Only the last repeat_last_n tokens count; 0 turns the penalties off.
    out = x.copy()
    apply_penalties(out, np.array(hist), SamplingParams(repeat_penalty=2.0, repeat_last_n=1))
    assert np.allclose(out, [2.0, -2.0, 1.0, 0.25])
    assert Sampler(SamplingParams.greedy(repeat_penalty=4.0, repeat_last_n=0)).sample(x, hist) == 0


# ---- Sequence: stops and UTF-8 -----------------------------------------------------------

PIECES = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: b"\xe6\x9d", 5: b"\xb1", 6: b"!",
          7: b"END", 8: b"<eos>", 9: b"\xff"}


def make_seq(criteria=StopCriteria(), prompt=(0,)) -> Sequence:
    return Sequence(0, list(prompt), Sampler(SamplingParams.greedy()), criteria,
                    frozenset({8}), PIECES.__getitem__)


def feed(seq: Sequence, tokens, n_ctx: int = 100) -> list[str]:
    return [seq.append(t, n_ctx) for t in tokens]


def test_utf8_is_emitted_only_as_whole_characters():
    seq = make_seq()
    pieces = feed(seq, [4, 5, 6])
    assert pieces == ["", "東", "!"]
    seq = make_seq(StopCriteria(max_tokens=2))
    assert feed(seq, [6, 4]) == ["!", "\ufffd"]  # half a character at the end: replaced
    assert seq.finish_reason == "length"


def test_end_of_generation_token():
    seq = make_seq()
    assert feed(seq, [0, 1, 8]) == ["Hel", "lo", ""]
    assert seq.finish_reason == "eog" and seq.output == [0, 1] and seq.text == "Hello"
    seq = make_seq(StopCriteria(ignore_eos=True))
    feed(seq, [0, 8, 1])
    assert not seq.is_finished and seq.text == "Hel<eos>lo"


def test_stop_string_across_tokens_is_never_emitted():
    seq = make_seq(StopCriteria(stop=("lo wo", "xyz")))
    pieces = feed(seq, [0, 1, 2])
    assert seq.finish_reason == "stop"
    assert "".join(pieces) == seq.text == "Hel"
    # "l", then "lo", were held back: each could begin "lo wo".
    assert pieces == ["He", "l", ""]
    assert seq.output == [0, 1, 2]


def test_held_back_text_is_released_when_it_is_no_stop():
    seq = make_seq(StopCriteria(stop=("lo!",)))
    assert feed(seq, [0, 1, 3]) == ["He", "l", "lold"]
    assert not seq.is_finished


def test_max_tokens_and_full_context():
    seq = make_seq(StopCriteria(max_tokens=3))
    feed(seq, [0, 1, 2])
    assert seq.finish_reason == "length" and seq.text == "Hello wor"
    seq = make_seq(StopCriteria(max_tokens=None), prompt=(0, 1, 2))
    feed(seq, [3, 6], n_ctx=5)
    assert seq.finish_reason == "context" and seq.n_tokens == 5


@pytest.mark.parametrize("kwargs,words", [
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_stop_criteria_validate(kwargs, words):
    with pytest.raises(InvalidParameterError, match=words):
        StopCriteria(**kwargs)


# ---- Scheduler -----------------------------------------------------------------------------

def test_scheduler_mixes_decode_and_prefill_chunks_under_the_budget():
    sched = Scheduler(n_slots=2, n_ctx=64, max_batch_tokens=8)
    a, b, c = (make_seq(prompt=range(n)) for n in (5, 10, 3))
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()  # a whole (5), b's first 3 tokens
    assert (a.slot, b.slot) == (0, 1) and c.slot is None
    assert list(step.seq_ids) == [0] * 5 + [1] * 3
    assert list(step.positions) == [0, 1, 2, 3, 4, 0, 1, 2]
    assert list(np.flatnonzero(step.want_logits)) == [4] and step.samples == (a,)
    sched.advance(step)
    a.append(6, 64)
    step = sched.schedule()  # a's decode token first, then 7 more of b
    assert step.n_tokens == 8 and step.n_decode == 1
    assert list(step.seq_ids) == [0] + [1] * 7 and list(step.positions) == [5] + list(range(3, 10))
    assert step.samples == (a, b)
    sched.advance(step)
    a.finish("eog")
    assert sched.release(a) == 0
    step = sched.schedule()  # c takes the freed slot 0
    assert c.slot == 0 and list(step.seq_ids) == [0, 0, 0]


def test_scheduler_rejects_prompts_that_do_not_fit():
    sched = Scheduler(n_slots=1, n_ctx=4)
    with pytest.raises(NumbaHybridError, match="prompt 0 has 4 tokens, but the context holds 4"):
        sched.add(make_seq(prompt=range(4)))
    with pytest.raises(NumbaHybridError, match="empty"):
        sched.add(make_seq(prompt=()))


# ---- generation on a model -----------------------------------------------------------------

SEEDED = SamplingParams(temperature=1.1, top_k=60, top_p=0.97, min_p=0.01, repeat_penalty=1.1,
                        presence_penalty=0.2, seed=1234)


def test_seeded_generation_is_reproducible():
    m = load()
    a = m.generate(PROMPTS[0], max_tokens=24, sampling=SEEDED)
    b = m.generate(PROMPTS[0], max_tokens=24, sampling=SEEDED)
    c = m.generate(PROMPTS[0], max_tokens=24,
                   sampling=SamplingParams(**{**SEEDED.__dict__, "seed": 99}))
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) == 24
    assert a.token_ids != c.token_ids and a.seed == 1234
    assert a.prompt_token_ids == m.tokenizer.encode(PROMPTS[0])
    assert a.text == m.tokenizer.decode(a.token_ids)
    # Without a seed, each sequence gets a fresh one, reported so the run can be repeated.
    free = m.generate(PROMPTS[:2], max_tokens=24,
                      sampling=SamplingParams(**{**SEEDED.__dict__, "seed": None}))
    assert free[0].seed is not None and free[0].seed != free[1].seed
    again = m.generate(PROMPTS[1], max_tokens=24,
                       sampling=SamplingParams(**{**SEEDED.__dict__, "seed": free[1].seed}))
    assert again.token_ids == free[1].token_ids
    assert_slots_empty(m)


@pytest.mark.parametrize("model", MODELS)
def test_seeded_generation_alone_equals_beside_others(model):
    """Bitwise: a sequence samples the same tokens whatever runs beside it, however the
    prompts are chunked, and on whichever slot."""
    together = load(model).generate(PROMPTS, max_tokens=20, sampling=SEEDED,
                                    max_batch_tokens=7)
    one_slot = load(model, n_slots=1).generate(PROMPTS, max_tokens=20, sampling=SEEDED)
    assert [r.token_ids for r in together] == [r.token_ids for r in one_slot]
    first = load(model).generate(PROMPTS[0], max_tokens=20, sampling=SEEDED)
    assert first.token_ids == together[0].token_ids
    # Nor does its place in the list matter: each generator is seeded by its seed alone.
    shifted = load(model).generate(PROMPTS[::-1], max_tokens=20, sampling=SEEDED,
                                   max_batch_tokens=5)
    assert [r.token_ids for r in shifted[::-1]] == [r.token_ids for r in together]
    # Different seeds per prompt draw different samples of the same prompt.
    seeds = [SamplingParams(**{**SEEDED.__dict__, "seed": s}) for s in (1, 2, 1)]
    three = load(model).generate([PROMPTS[0]] * 3, max_tokens=20, sampling=seeds)
    assert three[0].token_ids == three[2].token_ids != three[1].token_ids
    assert [r.seed for r in three] == [1, 2, 1]


def test_more_prompts_than_slots_queue_for_free_slots():
    prompts = builtin_prompts(6)
    few = load(n_slots=2).generate(prompts, max_tokens=12, sampling=SamplingParams.greedy())
    many = load(n_slots=8).generate(prompts, max_tokens=12, sampling=SamplingParams.greedy())
    assert [r.token_ids for r in few] == [r.token_ids for r in many]
    assert [r.index for r in few] == list(range(6))
    assert_slots_empty(load(n_slots=2))


def test_streaming_pieces_make_the_text():
    m = load()
    gen = m.generate(PROMPTS[0], max_tokens=16, sampling=SEEDED, stream=True)
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == result.text
    assert result.token_ids == m.generate(PROMPTS[0], max_tokens=16, sampling=SEEDED).token_ids
    multi = list(m.generate(PROMPTS[:3], max_tokens=8, sampling=SEEDED, stream=True))
    texts = ["".join(t for i, t in multi if i == k) for k in range(3)]
    assert texts == [r.text for r in m.generate(PROMPTS[:3], max_tokens=8, sampling=SEEDED)]


def test_closing_a_stream_early_frees_the_slots():
    m = load()
    gen = m.generate(PROMPTS, max_tokens=50, sampling=SEEDED, stream=True)
    next(gen)
    gen.close()
    assert_slots_empty(m)


def force(token_ids: list[int], then: int | None = None):
    """A logits processor that makes the model emit ``token_ids``, then ``then``."""
    def process(seq, logits):
        k = len(seq.output)
        target = token_ids[k] if k < len(token_ids) else then
        if target is not None:
            logits = np.full_like(logits, -1e9)
            logits[target] = 0.0
            return logits
    return process


def test_stream_never_splits_a_character():
    m = load()
    tok = m.tokenizer
    ids = tok.encode("東京は 🙂!")
    assert any(len(tok.token_to_piece(i)) == 1 and tok.token_to_piece(i)[0] >= 0x80
               for i in ids)  # the fixture's vocabulary splits these characters into bytes
    pieces = list(m.generate("x", max_tokens=len(ids), sampling=SEEDED, stream=True,
                             logits_processors=[force(ids)]))
    assert "".join(pieces) == "東京は 🙂!"
    assert "\ufffd" not in "".join(pieces)
    assert len(pieces) <= len(ids) and all(pieces)


def test_end_of_generation_token_stops():
    m = load()
    eos = m.tokenizer.eos_id
    r = m.generate(PROMPTS[0], max_tokens=30, sampling=SamplingParams.greedy(),
                   logits_processors=[force([5, 6, 7], then=eos)])
    assert r.finish_reason == "eog" and r.token_ids == [5, 6, 7]
    r = m.generate(PROMPTS[0], max_tokens=5, sampling=SamplingParams.greedy(), ignore_eos=True,
                   logits_processors=[force([5, 6, 7], then=eos)])
    assert r.finish_reason == "length" and r.token_ids == [5, 6, 7, eos, eos]
    for other in m.tokenizer.eog_ids:
        r = m.generate(PROMPTS[0], max_tokens=5, sampling=SEEDED,
                       logits_processors=[force([9], then=other)])
        assert r.finish_reason == "eog" and r.token_ids == [9]


def test_stop_string_and_max_tokens_on_a_model():
    m = load()
    full = m.generate(PROMPTS[3], max_tokens=40, sampling=SamplingParams.greedy())
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    stop = full.text[10:14]
    cut = m.generate(PROMPTS[3], max_tokens=40, sampling=SamplingParams.greedy(), stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]


def test_generation_stops_when_the_context_is_full():
    m = load(n_slots=2, n_ctx=24)
    r = m.generate(PROMPTS[0], max_tokens=None, sampling=SEEDED, ignore_eos=True)
    assert r.finish_reason == "context"
    assert len(r.prompt_token_ids) + len(r.token_ids) == 24
    assert_slots_empty(m)


def test_bad_requests_fail_before_anything_runs():
    m = load(n_slots=2, n_ctx=24)
    long = "word " * 40
    with pytest.raises(NumbaHybridError, match="prompt 1 has .* tokens, but the context holds 24"):
        m.generate(["hi", long], max_tokens=4)
    with pytest.raises(NumbaHybridError, match="prompt 0 is empty"):
        m.generate("", max_tokens=4)
    with pytest.raises(InvalidParameterError, match="no prompts"):
        m.generate([], max_tokens=4)
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        m.generate("hi", max_tokens=0)
    with pytest.raises(NumbaHybridError, match="outside the vocabulary"):
        m.generate([1, 2, 99999])
    assert_slots_empty(m)


def test_chat_uses_the_template():
    m = load()
    msgs = [{"role": "user", "content": "Say hi"}]
    r = m.chat(msgs, max_tokens=6, sampling=SamplingParams.greedy())
    text = m.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert r.prompt_token_ids == m.tokenizer.encode(text)
    assert r.token_ids == m.generate(text, max_tokens=6,
                                     sampling=SamplingParams.greedy()).token_ids
    two = m.chat([msgs, [{"role": "user", "content": "Bye"}]], max_tokens=6,
                 sampling=SamplingParams.greedy())
    assert two[0].token_ids == r.token_ids and len(two) == 2
    with pytest.raises(InvalidParameterError, match="message 0"):
        m.chat([{"content": "no role"}])


def test_engine_step_by_step():
    m = load()
    engine = Engine(m, max_batch_tokens=4)
    seqs = [engine.add(m.tokenizer.encode(p), SamplingParams.greedy(), StopCriteria(3))
            for p in PROMPTS[:2]]
    n_steps = 0
    while engine.has_work:
        engine.step()
        n_steps += 1
    assert all(s.finish_reason == "length" and len(s.output) == 3 for s in seqs)
    st = engine.stats
    assert st.n_steps == n_steps and st.n_decode_tokens == 2 * 2
    assert st.n_prompt_tokens == sum(len(s.prompt) for s in seqs)
    assert_slots_empty(m)


# ---- perplexity ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def ppl_tokens() -> list[int]:
    """About 680 tokens: the fixture texts, repeated."""
    tok = load().tokenizer
    seqs = json.loads((DATA / "qwen35-tiny-tokens.json").read_text())["sequences"]
    text = (tok.decode(seqs["s130"]) + tok.decode(seqs["s40"])) * 4
    return tok.encode(text, add_special=True)


def test_perplexity_is_bitwise_independent_of_the_batch_size():
    m = load(n_slots=16, n_ctx=128)
    tokens = ppl_tokens()
    results = {ub: perplexity(m, tokens, n_ctx=128, n_ubatch=ub) for ub in (512, 2048, 128, 48)}
    assert {ub: r.n_seq for ub, r in results.items()} == {512: 4, 2048: 5, 128: 1, 48: 1}
    base = results[512]
    for r in results.values():
        assert (r.ppl, r.ppl_error, r.mean_nll, r.chunk_ppl) == \
            (base.ppl, base.ppl_error, base.mean_nll, base.chunk_ppl)
    assert base.n_chunks == len(tokens) // 128 == len(base.chunk_ppl)
    assert base.n_tokens_scored == base.n_chunks * 63


def test_perplexity_scores_the_second_half_of_each_chunk():
    """An independent computation: each chunk alone, all logits, scored by hand."""
    m = load(n_slots=16, n_ctx=128)
    tokens = np.array(ppl_tokens())
    c, first = 128, 64
    nll = []
    for k in range(len(tokens) // c):
        ids = tokens[k * c:(k + 1) * c]
        logits = m.decode(ids, np.arange(c), np.zeros(c, dtype=np.int64)).astype(np.float64)
        m.reset(0)
        for pos in range(first, c - 1):
            z = logits[pos]
            nll.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[ids[pos + 1]])
    nll = np.array(nll)
    r = perplexity(m, tokens, n_ctx=c, n_ubatch=512)
    assert r.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-12)
    err = np.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (nll.size - 1)) * np.exp(nll.mean())
    assert r.ppl_error == pytest.approx(err, rel=1e-9)
    assert token_nll(logits[:2], np.array([3, 4])) == pytest.approx(
        [np.log(np.exp(logits[i] - logits[i].max()).sum()) + logits[i].max() - logits[i][t]
         for i, t in ((0, 3), (1, 4))], rel=1e-12)


def test_perplexity_plan_and_errors():
    assert plan_perplexity(4096, 512, 2048, 512) == (8, 1, 512)
    assert plan_perplexity(4096, 512, 2048, 2048) == (8, 4, 2048)
    assert plan_perplexity(4096, 512, 1024, 2048) == (8, 2, 1024)  # -ub capped at -b
    assert plan_perplexity(4096, 512, 2048, 2048, max_chunks=3) == (3, 3, 2048)
    with pytest.raises(NumbaHybridError, match="the text has 1000 tokens; -c 512 needs at "
                                               "least 1024"):
        plan_perplexity(1000, 512, 2048, 512)
    with pytest.raises(NumbaHybridError, match="slots"):
        perplexity(load(n_slots=2, n_ctx=128), ppl_tokens(), n_ctx=128, n_ubatch=512)


# ---- the concurrency check -----------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_parallel_check_passes_for_1_to_6_sequences(model):
    m = load(model, n_slots=6, n_ctx=128)
    prompts = builtin_prompts(6)
    for n in range(1, 7):
        report = parallel_check(m, prompts[:n], n_predict=6, max_batch_tokens=16)
        assert report.ok, report.rows
        assert [r.n_alone for r in report.rows] == [6] * n
        assert all(len(t.logits) == 6 for t in report.together)
    assert_slots_empty(m)


def test_parallel_check_catches_a_one_ulp_difference():
    m = load(n_slots=4, n_ctx=128)
    report = parallel_check(m, builtin_prompts(4), n_predict=5)
    assert report.ok
    together = [type(t)(list(t.tokens), [x.copy() for x in t.logits]) for t in report.together]
    x = together[2].logits[3]
    ulp = float(np.nextafter(x[17], np.float32(np.inf))) - float(x[17])
    x[17] = np.nextafter(x[17], np.float32(np.inf))
    rows = compare_traces(report.alone, together)
    assert [r.ok for r in rows] == [True, True, False, True]
    bad = rows[2]
    assert bad.same_tokens and bad.first_diff == 3
    assert bad.max_abs_diff == pytest.approx(ulp)
    # A different token stream fails even with equal logits.
    together = [type(t)(list(t.tokens), list(t.logits)) for t in report.together]
    together[0].tokens[-1] += 1
    rows = compare_traces(report.alone, together)
    assert not rows[0].ok and not rows[0].same_tokens and rows[0].first_diff is None
    # A missing step fails too.
    together = [type(t)(list(t.tokens), list(t.logits)) for t in report.together]
    together[1].logits.pop()
    assert compare_traces(report.alone, together)[1].first_diff == 4
    assert isinstance(rows[0], CheckRow)


def test_parallel_check_needs_a_slot_per_sequence():
    with pytest.raises(NumbaHybridError, match="5 parallel sequences need 5 slots; the model "
                                               "has 4"):
        parallel_check(load(), builtin_prompts(5))


def test_builtin_prompts_are_all_different():
    assert len(set(builtin_prompts(40))) == 40
    assert sequences("qwen35-tiny")  # the fixtures are there
