"""Speed sweep: prompt processing and generation at growing context depth (as
llama.cpp's ``llama-sweep-bench``), and aggregate generation speed with N parallel
sequences (as ``llama-batched-bench``).

At each depth d, slot 0 is filled with d tokens (not timed) and its state kept; then
``n_ubatch`` prompt tokens are processed at positions d.. (timed: PP), the state is put
back, and ``n_gen`` tokens are generated one by one, each the argmax of the previous
logits (timed: TG). For N parallel sequences, N slots get an ``n_prompt``-token prompt
(not timed), then ``n_gen`` steps of N tokens each are timed. Tokens are drawn from a
fixed generator, so runs are comparable. Everything is warmed up first (JIT).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import numpy as np

from ..errors import NumbaHybridError


@dataclass(frozen=True)
class Timing:
    mean: float
    std: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        a = np.asarray(seconds, dtype=np.float64)
        return cls(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0)


@dataclass(frozen=True)
class SweepRow:
    depth: int
    n_pp: int
    t_pp: Timing
    n_tg: int
    t_tg: Timing

    @property
    def pp_speed(self) -> float:
        return self.n_pp / self.t_pp.mean

    @property
    def tg_speed(self) -> float:
        return self.n_tg / self.t_tg.mean


@dataclass(frozen=True)
class ParallelRow:
    n_parallel: int
    n_gen: int                       # tokens per sequence
    t: Timing

    @property
    def n_tokens(self) -> int:
        return self.n_parallel * self.n_gen

    @property
    def speed(self) -> float:
        """Tokens per second, all sequences together."""
        return self.n_tokens / self.t.mean

    @property
    def speed_per_seq(self) -> float:
        return self.n_gen / self.t.mean


def needed_ctx(depths: Seq[int], n_ubatch: int, n_gen: int, n_prompt: int) -> int:
    return max(max(depths) + max(n_ubatch, n_gen), n_prompt + n_gen)


def _tokens(rng: np.random.Generator, n_vocab: int, n: int) -> np.ndarray:
    return rng.integers(0, n_vocab, size=n, dtype=np.int64)


def _fill(model, slot: int, ids: np.ndarray, n_ubatch: int, start: int = 0) -> np.ndarray:
    """Feed ``ids`` to ``slot`` from ``start`` in pieces of ``n_ubatch``; last logits."""
    logits = None
    for s in range(0, ids.size, n_ubatch):
        piece = ids[s:s + n_ubatch]
        want = np.zeros(piece.size, dtype=bool)
        want[-1] = True
        logits = model.decode(piece, np.arange(start + s, start + s + piece.size),
                              np.full(piece.size, slot), logits=want)
    return logits


def _generate(model, slot: int, token: int, pos: int, n: int) -> float:
    """Seconds for ``n`` greedy single-token steps on ``slot`` from ``pos``."""
    t0 = time.perf_counter()
    for i in range(n):
        logits = model.decode([token], [pos + i], [slot])
        token = int(np.argmax(logits[0]))
    return time.perf_counter() - t0


def warm_up(model, n_ubatch: int, n_parallel: int) -> None:
    """Compile and touch every path the timings use (prefill, single and batched decode)."""
    rng = np.random.default_rng(1)
    n_vocab = model.args.n_vocab
    _fill(model, 0, _tokens(rng, n_vocab, min(n_ubatch, model.n_ctx - 2)), n_ubatch)
    model.reset(0)
    _generate(model, 0, 1, 0, 2)
    n = min(n_parallel, model.n_slots)
    model.decode(_tokens(rng, n_vocab, n), np.zeros(n, dtype=np.int64), np.arange(n))
    for s in range(model.n_slots):
        model.reset(s)


def sweep(model, depths: Seq[int], n_ubatch: int = 512, n_gen: int = 32, reps: int = 1,
          seed: int = 0, on_progress: Callable[[], None] | None = None) -> list[SweepRow]:
    """PP and TG speed at each depth (one row per depth), on slot 0."""
    if model.n_ctx < max(depths) + max(n_ubatch, n_gen):
        raise NumbaHybridError(f"depth {max(depths)} + {max(n_ubatch, n_gen)} tokens do not "
                               f"fit the context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    n_vocab = model.args.n_vocab
    rows = []
    for d in depths:
        model.reset(0)
        context = _tokens(rng, n_vocab, d)
        last = _fill(model, 0, context, n_ubatch) if d else None
        snap = model.state.snapshot(0)
        start = int(np.argmax(last[0])) if last is not None else int(rng.integers(n_vocab))
        batch = _tokens(rng, n_vocab, n_ubatch)
        t_pp, t_tg = [], []
        for _ in range(reps):
            model.state.restore(0, snap)
            want = np.zeros(n_ubatch, dtype=bool)
            want[-1] = True
            t0 = time.perf_counter()
            model.decode(batch, np.arange(d, d + n_ubatch), np.zeros(n_ubatch, np.int64),
                         logits=want)
            t_pp.append(time.perf_counter() - t0)
            model.state.restore(0, snap)
            t_tg.append(_generate(model, 0, start, d, n_gen))
            if on_progress is not None:
                on_progress()
        model.reset(0)
        rows.append(SweepRow(d, n_ubatch, Timing.of(t_pp), n_gen, Timing.of(t_tg)))
    return rows


def parallel_generation(model, n_parallel: Seq[int], n_gen: int = 32, n_prompt: int = 32,
                        n_ubatch: int = 512, reps: int = 1, seed: int = 0,
                        on_progress: Callable[[], None] | None = None) -> list[ParallelRow]:
    """Aggregate generation speed with N sequences decoding together, for each N."""
    if max(n_parallel) > model.n_slots:
        raise NumbaHybridError(f"-np {max(n_parallel)} is larger than the model's "
                               f"{model.n_slots} slots")
    if model.n_ctx < n_prompt + n_gen:
        raise NumbaHybridError(f"{n_prompt} prompt + {n_gen} generated tokens do not fit "
                               f"the context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    n_vocab = model.args.n_vocab
    rows = []
    for n in n_parallel:
        prompts = [_tokens(rng, n_vocab, n_prompt) for _ in range(n)]
        times = []
        for _ in range(reps):
            first = [int(np.argmax(_fill(model, s, p, n_ubatch)[0]))
                     for s, p in enumerate(prompts)]
            tokens = np.array(first, dtype=np.int64)
            slots = np.arange(n)
            t0 = time.perf_counter()
            for i in range(n_gen):
                logits = model.decode(tokens, np.full(n, n_prompt + i), slots)
                tokens = np.argmax(logits, axis=1)
            times.append(time.perf_counter() - t0)
            for s in range(n):
                model.reset(s)
            if on_progress is not None:
                on_progress()
        rows.append(ParallelRow(n, n_gen, Timing.of(times)))
    return rows


def plot(sweep_rows: list[SweepRow], parallel_rows: list[ParallelRow], path: str,
         title: str = "") -> None:
    """Draw both tables to a PNG (needs matplotlib: the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NumbaHybridError("--plot needs matplotlib: pip install 'numba-hybrid[bench]'") \
            from None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    depths = [r.depth for r in sweep_rows]
    for ax, speeds, what in ((axes[0], [r.pp_speed for r in sweep_rows], "prompt processing"),
                             (axes[1], [r.tg_speed for r in sweep_rows], "generation")):
        ax.plot(depths, speeds, marker="o")
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if parallel_rows:
        nps = [r.n_parallel for r in parallel_rows]
        ax = axes[2]
        ax.plot(nps, [r.speed for r in parallel_rows], marker="o", label="all sequences")
        ax.plot(nps, [r.speed_per_seq for r in parallel_rows], marker="s",
                label="per sequence")
        ax.set_xlabel("parallel sequences")
        ax.set_ylabel("tokens/s")
        ax.set_xticks(nps)
        ax.set_title("generation, N sequences")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)
    else:
        axes[2].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
