"""llama.cpp, through llama-cpp-python's low-level API, behind numba_hybrid's
``decode``/``reset`` interface, so that one measurement routine drives both engines.

One context holds ``n_seq`` sequences (``n_seq_max``; per-sequence KV cells, as
llama-server's parallel slots have); ``decode`` fills one ``llama_batch`` with explicit
positions and sequence ids and makes one ``llama_decode`` call. A development tool for
bench/compare.py only: numba_hybrid never imports it.
"""

from __future__ import annotations

import numpy as np
import llama_cpp as L
from llama_cpp._logger import set_verbose


class LlamaPeer:
    def __init__(self, path: str, n_seq: int, n_ctx_seq: int, n_batch: int, threads: int):
        set_verbose(False)                                  # llama.cpp logs: errors only
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * -(-n_ctx_seq // 256) * 256      # llama.cpp pads to 256 a sequence
        cp.n_seq_max = n_seq
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot create a context for {path}")
        if L.llama_n_ctx_seq(self.ctx) < n_ctx_seq:
            raise RuntimeError(f"llama.cpp gave {L.llama_n_ctx_seq(self.ctx)} positions per "
                               f"sequence, {n_ctx_seq} asked")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        # the scalar arrays of the batch as numpy views; seq_id is an array of pointers
        self._tok, self._pos, self._nsid, self._out = (
            np.ctypeslib.as_array(p, (n_batch,)) for p in
            (self.batch.token, self.batch.pos, self.batch.n_seq_id, self.batch.logits))

    def decode(self, tokens, positions, seq_ids, logits=None) -> np.ndarray:
        """One llama_decode of the batch; logits [n_out, n_vocab] of the flagged tokens
        (default: all; the context keeps at most one output per sequence and batch)."""
        tokens, positions, seq_ids = (np.asarray(a, np.int64).ravel()
                                      for a in (tokens, positions, seq_ids))
        n = tokens.size
        if n > self.n_batch:
            raise ValueError(f"{n} tokens, the batch holds {self.n_batch}")
        flags = np.ones(n, bool) if logits is None else np.asarray(logits, bool)
        self._tok[:n], self._pos[:n], self._nsid[:n], self._out[:n] = tokens, positions, 1, flags
        sid = self.batch.seq_id
        for i, s in enumerate(seq_ids.tolist()):
            sid[i][0] = s
        self.batch.n_tokens = n
        rc = L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, int(i)),
                                               (self.n_vocab,)).copy()
                         for i in np.flatnonzero(flags)]) if flags.any() else \
            np.empty((0, self.n_vocab), np.float32)

    def reset(self, seq_id: int) -> None:
        """Forget a sequence (its KV cells and recurrent state)."""
        L.llama_memory_seq_rm(self.mem, int(seq_id), -1, -1)

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
