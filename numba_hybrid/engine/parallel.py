"""The concurrency check: N prompts decoded greedily together must give exactly what each
gives alone.

Each prompt is first decoded alone (slot 0, reset afterwards), then all N together through
the engine with a small per-step token budget, so prompts are split into chunks that share
batches with the other sequences' decode tokens. Token streams and the logits of every
step are compared bitwise; on the CPU backend any difference, however small, is a bug
(state of one sequence reaching another).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumbaHybridError
from .engine import Engine
from .sampler import SamplingParams
from .sequence import StopCriteria

# Varied on purpose: lengths from a few tokens to a paragraph, code, other scripts, digits.
PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Explain, in three short sentences, why the sky is blue during the day and red at "
    "sunset, for a curious child who has just asked.",
    "1, 1, 2, 3, 5, 8, 13,",
    "Das Wetter in Berlin ist heute",
    "東京は日本の首都で、",
    "<html>\n  <body>\n    <h1>",
    "Q: What is 17 times 23?\nA:",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "SELECT name, age FROM users WHERE",
    "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui",
)


def builtin_prompts(n: int) -> list[str]:
    """``n`` different prompts; past the built-in ones, numbered variants of them."""
    return [PROMPTS[i % len(PROMPTS)] + (f" ({i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
            for i in range(n)]


@dataclass
class Trace:
    """What greedy decoding of one prompt produced: tokens and the logits of each step."""

    tokens: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class CheckRow:
    index: int
    n_prompt: int
    n_alone: int
    n_together: int
    same_tokens: bool
    first_diff: int | None          # first step whose logits differ (None: none)
    max_abs_diff: float             # over the steps both runs have

    @property
    def ok(self) -> bool:
        return self.same_tokens and self.first_diff is None


def compare_traces(alone: Seq[Trace], together: Seq[Trace],
                   n_prompt: Seq[int] | None = None) -> list[CheckRow]:
    """One row per sequence: are the token streams and every step's logits bitwise equal?
    ``n_prompt``: prompt lengths, for the report."""
    if len(alone) != len(together):
        raise ValueError(f"{len(alone)} sequences alone, {len(together)} together")
    rows = []
    for i, (a, b) in enumerate(zip(alone, together)):
        first, worst = None, 0.0
        for step, (x, y) in enumerate(zip(a.logits, b.logits)):
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                first = step if first is None else first
                if x.shape == y.shape:
                    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                    worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
                else:
                    worst = float("inf")
        if len(a.logits) != len(b.logits) and first is None:
            first = min(len(a.logits), len(b.logits))
        rows.append(CheckRow(i, n_prompt[i] if n_prompt else -1, len(a.tokens),
                             len(b.tokens), a.tokens == b.tokens, first, worst))
    return rows


def decode_together(model, prompts: list[list[int]], n_predict: int,
                    max_batch_tokens: int) -> list[Trace]:
    """Greedy decoding of all ``prompts`` in one engine (sequence i on its own slot),
    ``n_predict`` tokens each, end-of-generation tokens ignored; logits of every step."""
    traces = [Trace() for _ in prompts]

    def record(seq, logits):
        traces[seq.index].logits.append(np.array(logits, dtype=np.float32))

    engine = Engine(model, max_batch_tokens, logits_processors=[record])
    criteria = StopCriteria(max_tokens=n_predict, ignore_eos=True)
    seqs = [engine.add(p, SamplingParams.greedy(), criteria) for p in prompts]
    try:
        for _ in engine.events():
            pass
    finally:
        engine.abort()
    for seq, trace in zip(seqs, traces):
        trace.tokens = list(seq.output)
    return traces


@dataclass
class ParallelReport:
    rows: list[CheckRow]
    alone: list[Trace]
    together: list[Trace]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def parallel_check(model, prompts: Seq[str | list[int]], n_predict: int = 32,
                   max_batch_tokens: int = 32,
                   on_progress: Callable[[], None] | None = None) -> ParallelReport:
    """Decode ``prompts`` greedily one at a time, then all at once, and compare."""
    n = len(prompts)
    if n < 1:
        raise NumbaHybridError("the parallel check needs at least one prompt")
    if n > model.n_slots:
        raise NumbaHybridError(f"{n} parallel sequences need {n} slots; the model has "
                               f"{model.n_slots}")
    ids = [model.tokenizer.encode(p, add_special=True) if isinstance(p, str) else list(p)
           for p in prompts]
    alone = []
    for p in ids:
        alone += decode_together(model, [p], n_predict, max_batch_tokens)
        if on_progress is not None:
            on_progress()
    together = decode_together(model, ids, n_predict, max_batch_tokens)
    rows = compare_traces(alone, together, [len(p) for p in ids])
    return ParallelReport(rows, alone, together)
