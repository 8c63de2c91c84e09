"""The public Model: a loaded GGUF, its tokenizer, a backend and a StatePool."""

from __future__ import annotations

import os

import numpy as np

from .backend import DEFAULT_PRECISION, create_backend
from .batch import plan_batch
from .errors import NumbaHybridError
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
                 n_ctx: int = 4096, precision: str = DEFAULT_PRECISION,
                 threads: int | None = None):
        if int(n_slots) < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        if int(n_ctx) < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        self.path = os.fspath(path)
        self.file = GGUFFile(self.path)
        self.weights = read_model(self.file)
        self.args = self.weights.args
        self.tokenizer = Tokenizer.from_gguf(self.file)
        if threads is not None:
            set_threads(threads)
        self.backend = create_backend(device, self.weights, precision)
        self.device = device
        self.precision = precision
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

    def generate(self, prompt, max_tokens: int | None = 256, sampling=None,
                 stream: bool = False, stop=None, ignore_eos: bool = False,
                 max_batch_tokens: int = 512, logits_processors=()):
        """Continue a prompt (a string or token ids) or a list of prompts, concurrently on
        the model's slots (more prompts than slots wait for a free one).

        ``sampling``: a :class:`SamplingParams`, or one per prompt (default: llama.cpp's
        temperature 0.8, top-k 40, top-p 0.95, min-p 0.05; ``SamplingParams.greedy()`` for
        argmax). A seeded sequence samples the same tokens alone or beside any others.
        Stops at an end-of-generation token, a ``stop`` string, ``max_tokens`` (None: no
        limit) or a full context. Returns a Completion (text, token_ids, finish_reason,
        seed), or a list of them; with ``stream=True`` a generator of text pieces (``str``,
        or ``(index, str)`` for a list), never half a UTF-8 character. The slots are used
        from position 0 and left empty."""
        from .engine import generate

        return generate(self, prompt, max_tokens=max_tokens, sampling=sampling,
                        stream=stream, stop=stop, ignore_eos=ignore_eos,
                        max_batch_tokens=max_batch_tokens,
                        logits_processors=logits_processors)

    def chat(self, messages, **kwargs):
        """Reply to a conversation (a list of ``{"role", "content"}`` dicts), or to a list
        of conversations, through the GGUF's chat template; options and results as in
        :meth:`generate`."""
        from .engine import chat

        return chat(self, messages, **kwargs)

    def __repr__(self) -> str:
        a = self.args
        return (f"Model({os.path.basename(self.path)!r}, arch={a.arch}, device={self.device}, "
                f"n_slots={self.n_slots}, n_ctx={self.n_ctx})")


def load(path: str | os.PathLike | None = None, device: str = "reference", n_slots: int = 4,
         n_ctx: int = 4096, precision: str = DEFAULT_PRECISION,
         threads: int | None = None) -> Model:
    """Load a GGUF model (the bundled default model when ``path`` is None).

    ``device``: "reference" | "cpu" | "cuda". ``precision``: "fast" (the default: activations
    rounded to 8-bit blocks as ggml does, integer kernels) or "exact" (float32 activations,
    the weights exactly as dequantised). ``threads``: CPU threads
    for the kernels (default: all)."""
    if path is None:
        from .default_model import default_model_path

        path = default_model_path()
    return Model(path, device=device, n_slots=n_slots, n_ctx=n_ctx, precision=precision,
                 threads=threads)


def set_threads(n: int) -> None:
    """Use n threads in the CPU kernels (1 .. the number Numba started with)."""
    import numba

    top = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= top:
        raise NumbaHybridError(f"threads must be between 1 and {top}, got {n}")
    numba.set_num_threads(int(n))
