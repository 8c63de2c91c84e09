"""The public Model: a loaded GGUF, its tokenizer, a backend and a StatePool."""

from __future__ import annotations

import os

import numpy as np

from .backend import create_backend
from .batch import plan_batch
from .gguf_file import GGUFFile
from .models import read_model
from .state import StatePool
from .tokenizer import Tokenizer


class Model:
    """A model ready to decode batches of several sequences.

    Each sequence id is a state slot (0..n_slots-1). ``decode`` takes llama_decode-style
    parallel arrays; tokens of several sequences may be interleaved, each sequence
    continuing from where its slot stopped, or starting again at position 0.
    """

    def __init__(self, path: str | os.PathLike, device: str = "reference", n_slots: int = 4,
                 n_ctx: int = 4096):
        if int(n_slots) < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        if int(n_ctx) < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        self.path = os.fspath(path)
        self.file = GGUFFile(self.path)
        self.weights = read_model(self.file)
        self.args = self.weights.args
        self.tokenizer = Tokenizer.from_gguf(self.file)
        self.backend = create_backend(device, self.weights)
        self.device = device
        self.state = StatePool(self.args, int(n_slots), int(n_ctx),
                               dtype=self.backend.state_dtype, kv_dtype=self.backend.kv_dtype)

    @property
    def n_slots(self) -> int:
        return self.state.n_slots

    @property
    def n_ctx(self) -> int:
        return self.state.n_ctx

    def decode(self, tokens, positions, seq_ids, logits=None, dtype=np.float32) -> np.ndarray:
        """Run one batch; returns logits [n_out, n_vocab] for every token whose flag in
        ``logits`` is true (default: all), in batch order. An invalid batch raises
        BatchError before any state changes."""
        plan = plan_batch(tokens, positions, seq_ids, logits, self.state.pos,
                          self.state.n_ctx, self.args.n_vocab)
        for slot, reset in zip(plan.run_slot, plan.run_reset):
            if reset:
                self.state.clear(slot)
        out = self.backend.forward(self.state, plan)
        self.state.pos[plan.run_slot] = plan.run_last_pos
        return np.asarray(out, dtype=dtype)

    def reset(self, seq_id: int) -> None:
        """Forget a sequence: its slot is empty again."""
        self.state.clear(seq_id)

    def position(self, seq_id: int) -> int:
        """The next position of a sequence (0 for an empty slot)."""
        return int(self.state.pos[self.state.check_slot(seq_id)]) + 1

    def __repr__(self) -> str:
        a = self.args
        return (f"Model({os.path.basename(self.path)!r}, arch={a.arch}, device={self.device}, "
                f"n_slots={self.n_slots}, n_ctx={self.n_ctx})")


def load(path: str | os.PathLike | None = None, device: str = "reference", n_slots: int = 4,
         n_ctx: int = 4096) -> Model:
    """Load a GGUF model (the bundled default model when ``path`` is None).
    ``device``: "reference" | "cpu" | "cuda"."""
    if path is None:
        from .default_model import default_model_path

        path = default_model_path()
    return Model(path, device=device, n_slots=n_slots, n_ctx=n_ctx)
