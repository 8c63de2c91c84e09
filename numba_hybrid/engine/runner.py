"""Runner: runs a scheduled step through the model and keeps the time it took."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .scheduler import Step


@dataclass
class RunStats:
    """Tokens and seconds spent in the model (sampling not included)."""

    n_steps: int = 0
    n_prompt_tokens: int = 0
    n_decode_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        n = self.n_prompt_tokens + self.n_decode_tokens
        return n / self.seconds if self.seconds > 0 else 0.0


class Runner:
    def __init__(self, model):
        self.model = model
        self.stats = RunStats()

    def forward(self, step: Step) -> np.ndarray:
        """Logits [len(step.samples), V] (float32), one row per sampling sequence."""
        t0 = time.perf_counter()
        logits = self.model.decode(step.tokens, step.positions, step.seq_ids,
                                   logits=step.want_logits, dtype=np.float32)
        s = self.stats
        s.seconds += time.perf_counter() - t0
        s.n_steps += 1
        s.n_decode_tokens += step.n_decode
        s.n_prompt_tokens += step.n_tokens - step.n_decode
        return logits

    def release(self, slot: int) -> None:
        """Empty a slot, so the next sequence on it starts clean."""
        self.model.reset(slot)
