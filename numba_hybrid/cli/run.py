"""``numba-hybrid run``: continue prompts, one streamed or several at once on parallel
slots, with llama.cpp's sampling options."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import NumbaHybridError
from .common import (PROG, DeferredInterrupt, deferring_interrupts, _add_batch_arguments,
                     _add_runtime_arguments, _batch_budget, _int, _model_path, _n_predict,
                     _non_negative_int, _positive_int, _read_text)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("-p", "--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt to continue; repeat -p to run several prompts concurrently, "
                        "each on its own slot")
    p.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                   help="read a prompt from a UTF-8 text file (repeatable; after the -p "
                        "prompts)")
    p.add_argument("-n", "--n-predict", type=_n_predict, default=256, metavar="N",
                   help="most tokens to generate per prompt; -1: until an end-of-generation "
                        "token or a full context (default: %(default)s)")
    p.add_argument("-c", "--ctx-size", type=_non_negative_int, default=4096, metavar="N",
                   help="context length per sequence, prompt included; 0: the model's "
                        "training context (default: %(default)s)")
    p.add_argument("-np", "--parallel", type=_positive_int, default=None, metavar="N",
                   help="sequence slots; with more prompts than slots the rest wait for a "
                        "free one (default: one per prompt)")
    _add_batch_arguments(p, 512, "long prompts are processed in chunks of this size, "
                                 "alongside the other sequences' generation")
    g = p.add_argument_group("sampling (llama.cpp's order: penalties, top-k, top-p, min-p, "
                             "temperature)")
    g.add_argument("--temp", type=_float, default=0.8, metavar="T",
                   help="temperature; 0 = greedy, always the most likely token "
                        "(default: %(default)s)")
    g.add_argument("--top-k", type=_non_negative_int, default=40, metavar="K",
                   help="sample among the K most likely tokens; 0 = all (default: %(default)s)")
    g.add_argument("--top-p", type=_float, default=0.95, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to P; "
                        "1 = all (default: %(default)s)")
    g.add_argument("--min-p", type=_float, default=0.05, metavar="P",
                   help="drop tokens less likely than P times the most likely one; 0 = none "
                        "(default: %(default)s)")
    g.add_argument("--repeat-penalty", type=_float, default=1.0, metavar="X",
                   help="penalize tokens seen in the last --repeat-last-n; 1 = off "
                        "(default: %(default)s)")
    g.add_argument("--repeat-last-n", type=_int, default=64, metavar="N",
                   help="how many recent tokens the penalties look at; 0 = off, -1 = all "
                        "(default: %(default)s)")
    g.add_argument("--presence-penalty", type=_float, default=0.0, metavar="X",
                   help="subtracted from the logit of every recent token; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--frequency-penalty", type=_float, default=0.0, metavar="X",
                   help="subtracted per occurrence of a recent token; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("-s", "--seed", type=_seed, default=-1, metavar="SEED",
                   help="random seed: each prompt samples from its own generator seeded "
                        "with it, so a prompt gives the same text alone or beside others; -1 "
                        "= a fresh seed per prompt, printed at the end (default: %(default)s)")
    g = p.add_argument_group("stopping and chat")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); repeatable")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-generation tokens")
    g.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat "
                        "template and print the assistant's reply")
    g.add_argument("-sys", "--system-prompt", default=None, metavar="TEXT",
                   help="with --chat: a system message before the user's")


def _seed(text: str) -> int:
    value = _int(text)
    if value < -1 or value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be -1 (random) or 0 .. 2^64-1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _sampling_params(args: argparse.Namespace):
    from ..engine import SamplingParams

    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=None if args.seed == -1 else args.seed)


def _training_ctx(path: str) -> int:
    from ..gguf_file import GGUFFile
    from ..models import read_model

    return read_model(GGUFFile(path)).args.n_ctx_train


def _run(args: argparse.Namespace, interrupt: DeferredInterrupt) -> int:
    from ..engine import Engine, StopCriteria
    from ..engine.engine import render_chat
    from . import _load  # on the package, at call time: see numba_hybrid.cli

    prompts = list(args.prompt) + [_read_text(f, "prompt file") for f in args.file]
    if not prompts:
        raise NumbaHybridError("no prompt: give one with -p TEXT (or -f FILE)")
    if args.system_prompt is not None and not args.chat:
        raise NumbaHybridError("--system-prompt only applies with --chat")
    sampling = _sampling_params(args)
    criteria = StopCriteria(None if args.n_predict == -1 else args.n_predict,
                            tuple(args.stop), args.ignore_eos)
    n_ctx = args.ctx_size or _training_ctx(_model_path(args))
    # More slots than prompts would only take memory.
    model = _load(args, min(args.parallel or len(prompts), len(prompts)), n_ctx)
    interrupt.check()
    tok = model.tokenizer

    def ids_of(text: str) -> list[int]:
        if not args.chat:
            return tok.encode(text, add_special=True)
        system = ([{"role": "system", "content": args.system_prompt}]
                  if args.system_prompt is not None else [])
        return render_chat(tok, system + [{"role": "user", "content": text}])

    engine = Engine(model, _batch_budget(args))
    for i, text in enumerate(prompts):
        ids = ids_of(text)
        if not ids:
            raise NumbaHybridError(f"prompt {i} is empty")
        if len(ids) >= model.n_ctx:
            raise NumbaHybridError(
                f"prompt {i} has {len(ids)} tokens, longer than the context allows "
                f"(-c {model.n_ctx} leaves room for {model.n_ctx - 1} prompt tokens); raise -c "
                f"or shorten the prompt")
        engine.add(ids, sampling, criteria, index=i)

    out = sys.stdout
    single = len(prompts) == 1
    shown: set[int] = set()

    def show(seq) -> None:
        shown.add(seq.index)
        note = "" if seq.finish_reason != "interrupted" else " [interrupted]"
        out.write(f"[{seq.index}] {seq.text}{note}\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        for ev in engine.events():
            if single:
                if ev.text:
                    out.write(ev.text)
                    out.flush()
            elif ev.finished:
                show(ev.seq)
            interrupt.check()
        if single:
            out.write("\n")
    except KeyboardInterrupt:
        engine.abort()
        if single:
            out.write(engine.sequences[0].take_text() + "\n")
        else:
            for seq in engine.sequences:
                if seq.index not in shown:
                    show(seq)
        out.flush()
        _report_run(engine, time.perf_counter() - t0)
        raise
    _report_run(engine, time.perf_counter() - t0)
    return 0


cmd_run = deferring_interrupts(_run)


def _report_run(engine, seconds: float) -> None:
    """One line on stderr: tokens, time, why the sequences stopped, their seeds."""
    seqs = engine.sequences
    n_gen = sum(len(s.output) for s in seqs)
    reasons = ", ".join(sorted({s.finish_reason or "unfinished" for s in seqs}))
    speed = f", {n_gen / seconds:.1f} generated tokens/s" if seconds > 0 else ""
    seeds = sorted({s.seed for s in seqs if s.seed is not None})
    seeds_text = (f"; seed {seeds[0]}" if len(seeds) == 1 else
                  f"; seeds {', '.join(str(s.seed) for s in seqs)}" if seeds else "")
    print(f"{PROG}: {engine.stats.n_prompt_tokens} prompt + {n_gen} generated tokens in "
          f"{seconds:.2f} s{speed}; stopped by: {reasons}{seeds_text}", file=sys.stderr)
