"""Scheduler: continuous batching over the model's slots.

Each step is one ``Model.decode`` batch of at most ``max_batch_tokens`` tokens, filled in
this order:

1. the decode token of every running sequence that has sampled one (rotating the order
   when they outnumber the budget, so none starves);
2. the next prefill chunk of running sequences whose prompt is not all in their slot;
3. new sequences, each given the lowest free slot and a first chunk of its prompt.

So a long prompt is split over several steps while the others keep generating, and a
finished sequence's slot takes the next waiting one on the following step. Logits are
asked only for a sequence's last pending token (a decode token, or the end of its
prompt), which is the one it samples from.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import NumbaHybridError
from .sequence import Sequence, Status


@dataclass(frozen=True)
class Step:
    """One batch, in Model.decode's terms, and which sequences it advances.

    chunks   (sequence, number of its pending tokens fed), in batch order
    samples  the sequences that sample after this step, in the order of the logits rows
    """

    tokens: np.ndarray
    positions: np.ndarray
    seq_ids: np.ndarray
    want_logits: np.ndarray
    chunks: tuple[tuple[Sequence, int], ...]
    samples: tuple[Sequence, ...]
    n_decode: int        # tokens that were sampled; the others are prompt tokens

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


class Scheduler:
    def __init__(self, n_slots: int, n_ctx: int, max_batch_tokens: int = 512):
        if max_batch_tokens < 1:
            raise NumbaHybridError(f"the batch must hold at least 1 token, got "
                                   f"{max_batch_tokens}")
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []       # in order of admission
        self._free = list(range(n_slots))       # a heap: the lowest free slot first
        self._rotate = 0

    def add(self, seq: Sequence) -> None:
        if not seq.prompt:
            raise NumbaHybridError(f"prompt {seq.index} is empty: there is nothing to "
                                   f"continue")
        if len(seq.prompt) >= self.n_ctx:
            raise NumbaHybridError(
                f"prompt {seq.index} has {len(seq.prompt)} tokens, but the context holds "
                f"{self.n_ctx} ({self.n_ctx - 1} at most, to leave room for one new token); "
                f"shorten the prompt or raise the context size")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step | None:
        """The next batch, or None when there is nothing to run."""
        budget = self.max_batch_tokens
        chunks: list[tuple[Sequence, int]] = []

        decoding = [s for s in self.running if not s.is_prefilling and s.n_pending]
        if decoding:
            k = self._rotate % len(decoding)
            decoding = decoding[k:] + decoding[:k]
            self._rotate += 1
        for seq in decoding[:budget]:
            chunks.append((seq, 1))
        n_decode = len(chunks)
        budget -= n_decode
        for seq in self.running:
            if budget and seq.is_prefilling:
                n = min(seq.n_pending, budget)
                chunks.append((seq, n))
                budget -= n
        while budget and self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            seq.status = Status.RUNNING
            seq.n_cached = 0
            self.running.append(seq)
            n = min(seq.n_pending, budget)
            chunks.append((seq, n))
            budget -= n
        if not chunks:
            return None

        tokens, positions, seq_ids, want = [], [], [], []
        samples = []
        for seq, n in chunks:
            start = seq.n_cached
            tokens.append(seq.tokens[start:start + n])
            positions.append(np.arange(start, start + n, dtype=np.int64))
            seq_ids.append(np.full(n, seq.slot, dtype=np.int64))
            flags = np.zeros(n, dtype=bool)
            if start + n == seq.n_tokens:
                flags[-1] = True
                samples.append(seq)
            want.append(flags)
        return Step(np.concatenate(tokens), np.concatenate(positions),
                    np.concatenate(seq_ids), np.concatenate(want), tuple(chunks),
                    tuple(samples), n_decode)

    def advance(self, step: Step) -> None:
        """Record that ``step`` ran: its tokens are in the slots now."""
        for seq, n in step.chunks:
            seq.n_cached += n

    def release(self, seq: Sequence) -> int | None:
        """Take a finished (or aborted) sequence out; returns the slot it freed."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return None
        if seq not in self.running:
            return None
        self.running.remove(seq)
        slot, seq.slot = seq.slot, None
        heapq.heappush(self._free, slot)
        return slot
