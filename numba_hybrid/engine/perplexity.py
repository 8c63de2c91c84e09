"""Perplexity of a text, as llama.cpp's ``llama-perplexity`` computes it.

The tokens are cut into ``n_chunk = len(tokens) // n_ctx`` chunks of ``n_ctx`` tokens; each
chunk is a fresh sequence at positions 0..n_ctx-1 (its first token replaced by BOS when the
model adds one). Only the second half is scored: with ``first = n_ctx // 2``, the logits at
positions first..n_ctx-2 predict tokens first+1..n_ctx-1.

``n_seq = max(1, n_ubatch // n_ctx)`` chunks run as parallel sequences, and no decode call
holds more than ``n_ubatch`` tokens (``n_ubatch`` is capped at ``n_batch``). The negative
log-likelihoods are summed in float64 in a fixed order -- chunk, then position -- and every
sequence's logits are bitwise independent of the batch around it, so the result is bitwise
the same for any ``n_ubatch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import NumbaHybridError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float                 # exp(mean NLL)
    ppl_error: float           # standard error of the mean NLL, times ppl (llama.cpp's)
    mean_nll: float
    n_tokens_scored: int
    n_chunks: int
    n_ctx: int
    n_seq: int                 # chunks per batch
    chunk_ppl: list[float] = field(default_factory=list)   # running value after each chunk


def plan_perplexity(n_tokens: int, n_ctx: int, n_batch: int, n_ubatch: int,
                    max_chunks: int | None = None) -> tuple[int, int, int]:
    """(n_chunk, n_seq, n_ubatch) for a text of ``n_tokens`` tokens, or a clear error."""
    if n_ctx < 4:
        raise NumbaHybridError(f"the context (-c) must be at least 4 tokens, got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise NumbaHybridError(f"the text has {n_tokens} tokens; -c {n_ctx} needs at least "
                               f"{2 * n_ctx} (two chunks)")
    n_ubatch = min(n_ubatch, n_batch)
    n_chunk = n_tokens // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n_chunk = min(n_chunk, max_chunks)
    n_seq = min(max(1, n_ubatch // n_ctx), n_chunk)
    return n_chunk, n_seq, n_ubatch


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(x.shape[0]), targets]


def perplexity(model, tokens, n_ctx: int = 512, n_batch: int = 2048, n_ubatch: int = 512,
               max_chunks: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``tokens`` (a list of ids; tokenize with the model's add_bos).
    ``on_chunk(i, running_ppl)`` is called after each chunk, in order."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n_chunk, n_seq, n_ubatch = plan_perplexity(tokens.size, n_ctx, n_batch, n_ubatch,
                                               max_chunks)
    if model.n_slots < n_seq:
        raise NumbaHybridError(f"{n_seq} chunks per batch need {n_seq} slots; the model has "
                               f"{model.n_slots}")
    if model.n_ctx < n_ctx:
        raise NumbaHybridError(f"chunks of {n_ctx} tokens need a context of {n_ctx}; the "
                               f"model has {model.n_ctx}")
    tok = model.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    first = n_ctx // 2
    want = np.zeros(n_ctx, dtype=bool)
    want[first:n_ctx - 1] = True

    nll_sum = nll2_sum = 0.0
    count = 0
    running = []
    for c0 in range(0, n_chunk, n_seq):
        group = range(c0, min(c0 + n_seq, n_chunk))
        chunks = []
        for c in group:
            ids = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
            if bos is not None:
                ids[0] = bos
            chunks.append(ids)
        rows = _score_group(model, chunks, want, n_ubatch)
        for ids, logits in zip(chunks, rows):
            # Fixed order: chunk after chunk, position after position.
            for v in token_nll(logits, ids[first + 1:]):
                nll_sum += v
                nll2_sum += v * v
            count += n_ctx - 1 - first
            running.append(math.exp(nll_sum / count))
            if on_chunk is not None:
                on_chunk(len(running), running[-1])
        for slot in range(len(chunks)):
            model.reset(slot)

    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl, err, mean, count, n_chunk, n_ctx, n_seq, running)


def _score_group(model, chunks: list[np.ndarray], want: np.ndarray,
                 n_ubatch: int) -> list[np.ndarray]:
    """Logits at the scored positions of each chunk, chunk i on slot i, in decode calls of
    at most ``n_ubatch`` tokens: whole chunks side by side, or one chunk in pieces."""
    n_ctx = want.size
    if len(chunks) > 1 or n_ubatch >= n_ctx:
        n = len(chunks)
        logits = model.decode(np.concatenate(chunks), np.tile(np.arange(n_ctx), n),
                              np.repeat(np.arange(n), n_ctx), logits=np.tile(want, n))
        per = int(want.sum())
        return [logits[i * per:(i + 1) * per] for i in range(n)]
    ids, pieces = chunks[0], []
    for s in range(0, n_ctx, n_ubatch):
        e = min(s + n_ubatch, n_ctx)
        pieces.append(model.decode(ids[s:e], np.arange(s, e), np.zeros(e - s, dtype=np.int64),
                                   logits=want[s:e]))
    return [np.concatenate(pieces)]
