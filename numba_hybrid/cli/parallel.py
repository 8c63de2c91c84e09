"""``numba-hybrid parallel``: check that N sequences decode together exactly as they do
alone."""

from __future__ import annotations

import argparse
import sys

from ..errors import NumbaHybridError
from .common import (PROG, DeferredInterrupt, deferring_interrupts, Progress,
                     _add_runtime_arguments, _positive_int, _read_text, _table)


def _parallel_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("-np", "--parallel", type=_positive_int, default=4, metavar="N",
                   help="number of sequences decoded at once (default: %(default)s)")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="UTF-8 file with one prompt per line (blank lines skipped); the "
                        "first N are used (default: built-in varied prompts)")
    p.add_argument("-n", "--n-predict", type=_positive_int, default=32, metavar="N",
                   help="tokens to generate per sequence, greedily, ignoring end-of-"
                        "generation tokens (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=_positive_int, default=32, metavar="N",
                   help="most tokens per step of the concurrent run; small, so prompts are "
                        "split into chunks that share batches with other sequences' "
                        "decoding (default: %(default)s)")


def _parallel(args: argparse.Namespace, interrupt: DeferredInterrupt) -> int:
    from ..engine.parallel import builtin_prompts, parallel_check
    from . import _load  # on the package, at call time: see numba_hybrid.cli

    n = args.parallel
    if args.prompts is not None:
        prompts = [line for line in _read_text(args.prompts, "prompts file").splitlines()
                   if line.strip()]
        if len(prompts) < n:
            raise NumbaHybridError(f"{args.prompts}: {len(prompts)} prompt(s); -np {n} needs "
                                   f"{n}, one per line")
        prompts = prompts[:n]
    else:
        prompts = builtin_prompts(n)
    # Byte-level BPE: a prompt has at most one token per byte, plus BOS. Sizing the context
    # from that bound lets a state too large for this machine fail before any tokenizing.
    longest = max(len(p.encode("utf-8")) for p in prompts) + 1
    model = _load(args, n, longest + args.n_predict)
    interrupt.check()
    ids = [model.tokenizer.encode(p, add_special=True) for p in prompts]
    print(f"{PROG}: {n} sequence(s), {args.n_predict} greedy tokens each: alone, then "
          f"together ({model.device} backend)", file=sys.stderr)
    bar = Progress(n, "alone", unit="seq")
    try:
        report = parallel_check(model, ids, args.n_predict, args.batch_size,
                                on_progress=interrupt.checking(bar.update))
    finally:
        bar.close()
    rows = [(r.index, r.n_prompt, f"{r.n_alone}/{r.n_together}",
             "yes" if r.same_tokens else "NO",
             "-" if r.first_diff is None else r.first_diff, f"{r.max_abs_diff:.3g}",
             "OK" if r.ok else "FAIL") for r in report.rows]
    print("\n".join(_table(rows, ("seq", "prompt tokens", "generated alone/together",
                                  "same tokens", "first differing step", "max |diff|",
                                  "result"), left=())))
    bad = [r.index for r in report.rows if not r.ok]
    if bad:
        print(f"FAIL: {len(bad)} of {n} sequences differ when decoded together "
              f"(sequences {', '.join(map(str, bad))})")
        return 1
    print(f"OK: all {n} sequences decode to bitwise identical tokens and logits alone and "
          f"together")
    return 0


cmd_parallel = deferring_interrupts(_parallel)
