"""numba_hybrid against llama.cpp (the llama-cpp-python package) on the same GGUF, in one run.

Both engines run the same file with the same thread count, alternating, several repetitions,
medians: prompt processing of 512 tokens, generation of 128 tokens after a 512-token prompt,
aggregate generation with 1, 2, 4 and 8 parallel sequences (128-token prompts, 64 new
tokens each; numba_hybrid only, see below), and multi-sequence prefill (8 prompts of 128
tokens in one batch). Prints the figures and ratios and writes bench/results/<date>-cpu.md.

llama-cpp-python's high-level API decodes one sequence per context, so the parallel rows
of the peer are left empty rather than measured unfairly.

    python bench/compare.py -m bench/models/a3b-8l-q4_k_m.gguf [-m ...] [-t 2] [-r 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numba_hybrid as nh  # noqa: E402

PROMPT, GEN, PAR_PROMPT, PAR_GEN = 512, 128, 128, 64


def ours(path: str, threads: int, reps: int) -> dict:
    m = nh.load(path, device="cpu", n_slots=8, n_ctx=PROMPT + GEN + 8, threads=threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.args.n_vocab, PROMPT)
    last = np.r_[np.zeros(PROMPT - 1, bool), True]
    m.decode(ids[:8], np.arange(8), np.zeros(8, int))                       # compile
    res: dict[str, list[float]] = {k: [] for k in ("pp", "tg", "np1", "np2", "np4", "np8",
                                                   "mpp")}
    for _ in range(reps):
        m.reset(0)
        t = time.perf_counter()
        m.decode(ids, np.arange(PROMPT), np.zeros(PROMPT, int), logits=last)
        res["pp"].append(PROMPT / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(GEN):
            m.decode([int(ids[i])], [PROMPT + i], [0])
        res["tg"].append(GEN / (time.perf_counter() - t))
        for n in (1, 2, 4, 8):
            for s in range(n):
                m.reset(s)
            toks = np.tile(ids[:PAR_PROMPT], n)
            pos = np.tile(np.arange(PAR_PROMPT), n)
            seq = np.repeat(np.arange(n), PAR_PROMPT)
            flags = pos == PAR_PROMPT - 1
            t = time.perf_counter()
            m.decode(toks, pos, seq, logits=flags)
            if n == 8:
                res["mpp"].append(n * PAR_PROMPT / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(PAR_GEN):
                m.decode(np.full(n, ids[i]), np.full(n, PAR_PROMPT + i), np.arange(n))
            res[f"np{n}"].append(n * PAR_GEN / (time.perf_counter() - t))
    return {k: float(np.median(v)) for k, v in res.items()}


def peer(path: str, threads: int, reps: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=PROMPT + GEN + 8, n_batch=PROMPT, n_ubatch=PROMPT,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, llm.n_vocab(), PROMPT)]
    res: dict[str, list[float]] = {"pp": [], "tg": []}
    llm.eval(ids[:8])
    for _ in range(reps):
        llm.reset()
        llm._ctx.kv_cache_clear()           # recurrent state too: the memory is hybrid
        t = time.perf_counter()
        llm.eval(ids)
        res["pp"].append(PROMPT / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(GEN):
            llm.eval([ids[i]])
        res["tg"].append(GEN / (time.perf_counter() - t))
    return {k: float(np.median(v)) for k, v in res.items()}


ROWS = [("pp", f"prompt processing, {PROMPT} tokens (tok/s)"),
        ("tg", f"generation, {GEN} tokens after {PROMPT} (tok/s)"),
        ("np1", "aggregate generation, 1 sequence (tok/s)"),
        ("np2", "aggregate generation, 2 sequences (tok/s)"),
        ("np4", "aggregate generation, 4 sequences (tok/s)"),
        ("np8", "aggregate generation, 8 sequences (tok/s)"),
        ("mpp", f"prefill of 8 x {PAR_PROMPT} tokens in one batch (tok/s)")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="measure numba_hybrid only")
    args = ap.parse_args()
    lines = [f"# CPU comparison, {datetime.date.today()}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
             f"{args.threads} threads; medians of {args.reps} repetitions.", ""]
    for path in args.model:
        a = ours(path, args.threads, args.reps)
        b = {} if args.no_peer else peer(path, args.threads, args.reps)
        lines += [f"## {Path(path).name}", "",
                  "| measure | numba_hybrid | llama.cpp | ratio |", "|---|---|---|---|"]
        for key, label in ROWS:
            theirs = b.get(key)
            ratio = f"{a[key] / theirs:.2f}x" if theirs else "-"
            lines.append(f"| {label} | {a[key]:.1f} | {theirs:.1f} | {ratio} |" if theirs
                         else f"| {label} | {a[key]:.1f} | - | - |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / f"{datetime.date.today()}-cpu.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
