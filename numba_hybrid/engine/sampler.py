"""Sampling: from one sequence's logits to its next token.

The chain runs in llama.cpp's default order, so its flags mean what they mean there:
penalties (repetition, presence, frequency over the last ``repeat_last_n`` tokens of
prompt and output) -> top-k -> top-p -> min-p -> temperature -> draw. Temperature 0 is
greedy: the penalised argmax, the lowest token id winning a tie.

Every step is a pure function of the logits, the token history and the sequence's own
random generator: probabilities are float64, candidates are ordered by (logit descending,
token id ascending), and one uniform number is drawn per token. Nothing depends on other
sequences, so a seeded sequence samples the same tokens alone or beside others.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import NumbaHybridError


class InvalidParameterError(NumbaHybridError, ValueError):
    """A sampling or generation parameter outside its range."""


def _check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = (f"at least {lo}" if hi is None else f"in {lo}..{hi}") if lo is not None \
            else f"at most {hi}"
        raise InvalidParameterError(f"{name} must be {rng}, got {value}")
    return value


def _check_float(name: str, value, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidParameterError(
            f"{name} must be {'greater than' if lo_open else 'at least'} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise InvalidParameterError(f"{name} must be at most {hi:g}, got {value:g}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How a sequence picks its tokens. The defaults are llama.cpp's.

    temperature        0 = greedy (argmax); otherwise logits are divided by it last
    top_k              keep the k most likely tokens (0: all)
    top_p              keep the most likely tokens whose probability sums to top_p (1: all)
    min_p              drop tokens less likely than min_p x the most likely one (0: none)
    repeat_penalty     divide positive / multiply negative logits of recent tokens (1: off)
    repeat_last_n      how many recent tokens (prompt and output) the penalties look at;
                       0 disables the penalties, -1 looks at the whole sequence
    presence_penalty   subtracted once from the logit of every recent token (0: off)
    frequency_penalty  subtracted per occurrence of every recent token (0: off)
    seed               the sequence's own numpy Generator is seeded with it alone, so a
                       seeded sequence samples the same tokens alone or beside any others, at
                       any place in a list of prompts. None: a fresh seed for each sequence
                       (reported in its Completion, to repeat it).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("temperature", _check_float("temperature", self.temperature, lo=0.0))
        put("top_k", _check_int("top_k", self.top_k, lo=0))
        put("top_p", _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True))
        put("min_p", _check_float("min_p", self.min_p, lo=0.0, hi=1.0))
        put("repeat_penalty", _check_float("repeat_penalty", self.repeat_penalty, lo=0.0,
                                           lo_open=True))
        put("repeat_last_n", _check_int("repeat_last_n", self.repeat_last_n, lo=-1))
        put("presence_penalty", _check_float("presence_penalty", self.presence_penalty))
        put("frequency_penalty", _check_float("frequency_penalty", self.frequency_penalty))
        if self.seed is not None:
            put("seed", _check_int("seed", self.seed, lo=0, hi=2**64 - 1))

    @classmethod
    def greedy(cls, **overrides) -> "SamplingParams":
        """Always the most likely token (after any penalties given in ``overrides``)."""
        return cls(**{"temperature": 0.0, **overrides})

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0
                                            or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)


class Sampler:
    """One sequence's sampler: its parameters and its own random generator."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator | None = None):
        if not params.is_greedy and rng is None:
            raise ValueError("a non-greedy sampler needs a random generator")
        self.params = params
        self.rng = rng

    def sample(self, logits: np.ndarray, history: np.ndarray | list[int] = ()) -> int:
        """The next token given ``logits`` [V] and the sequence so far (prompt + output)."""
        p = self.params
        x = np.array(logits, dtype=np.float64)  # a copy: the penalties write to it
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
        if p.has_penalties and len(history):
            apply_penalties(x, np.asarray(history, dtype=np.int64), p)
        if p.is_greedy:
            return int(np.argmax(x))  # first maximum: the lowest id wins a tie
        ids, probs = candidates(x, p)
        return int(ids[draw(probs, self.rng)])


def apply_penalties(x: np.ndarray, history: np.ndarray, p: SamplingParams) -> None:
    """Penalise, in place, the tokens among the last ``repeat_last_n`` of ``history``
    (llama.cpp's rule: repetition first, then frequency and presence)."""
    window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
    ids, counts = np.unique(window, return_counts=True)
    ids, counts = ids[(ids >= 0) & (ids < x.size)], counts[(ids >= 0) & (ids < x.size)]
    v = x[ids]
    if p.repeat_penalty != 1.0:
        v = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
    v = v - counts * p.frequency_penalty - p.presence_penalty
    x[ids] = v


def candidates(x: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids that survive top-k, top-p and min-p, most likely first, with their
    temperature-scaled probabilities (float64, summing to 1)."""
    x = np.where(np.isnan(x), -np.inf, x)
    if p.top_k and p.top_k < x.size:
        ids = _top_k_ids(x, p.top_k)
    else:
        ids = np.arange(x.size)
    # Stable sort of negated logits: descending logit, ascending id among equals.
    ids = ids[np.argsort(-x[ids], kind="stable")]
    z = x[ids]
    if not np.isfinite(z[0]):
        raise NumbaHybridError("every logit is -inf or NaN: nothing can be sampled")
    if p.top_p < 1.0:
        probs = _softmax(z)
        # Keep the shortest prefix reaching top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1
        ids, z = ids[:keep], z[:keep]
    if p.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p); the max always stays.
        keep = max(1, int(np.count_nonzero(z >= z[0] + math.log(p.min_p))))
        ids, z = ids[:keep], z[:keep]
    return ids, _softmax(z / p.temperature)


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest logits' ids; among equal logits at the cut, the lowest ids."""
    kth = np.partition(x, x.size - k)[x.size - k]
    above = np.flatnonzero(x > kth)
    at = np.flatnonzero(x == kth)[:k - above.size]
    return np.concatenate([above, at])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z[0]) if np.isfinite(z[0]) else np.zeros_like(z)
    return e / e.sum()


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the candidate a uniform draw lands on (inverse CDF, float64)."""
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), probs.size - 1)
