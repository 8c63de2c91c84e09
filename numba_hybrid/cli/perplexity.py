"""``numba-hybrid perplexity``: the perplexity of a text file, as llama-perplexity
computes it."""

from __future__ import annotations

import argparse
import sys

from ..errors import NumbaHybridError
from .common import (PROG, DeferredInterrupt, deferring_interrupts, Progress, _add_batch_arguments,
                     _add_runtime_arguments, _batch_budget, _n_predict, _positive_int, _read_text)


def _perplexity_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("-f", "--file", required=True, metavar="TEXT_FILE",
                   help="UTF-8 text to score (e.g. wiki.test.raw)")
    p.add_argument("-c", "--ctx-size", type=_positive_int, default=512, metavar="N",
                   help="chunk length in tokens; the second half of each chunk is scored "
                        "(default: %(default)s)")
    _add_batch_arguments(p, 512, "-ub / -c chunks run as parallel sequences in one batch "
                                 "(below -c, each chunk is fed in pieces)")
    p.add_argument("--chunks", type=_n_predict, default=-1, metavar="N",
                   help="score at most N chunks; -1 = all (default: %(default)s)")


def _perplexity(args: argparse.Namespace, interrupt: DeferredInterrupt) -> int:
    from ..engine.perplexity import perplexity, plan_perplexity
    from . import _load  # on the package, at call time: see numba_hybrid.cli

    text = _read_text(args.file)
    c = args.ctx_size
    model = _load(args, max(1, _batch_budget(args) // c), c)
    interrupt.check()
    tokens = model.tokenizer.encode(text, add_special=True)
    try:
        n_chunk, n_seq, ub = plan_perplexity(len(tokens), c, args.batch_size, args.ubatch_size,
                                             args.chunks)
    except NumbaHybridError as exc:
        raise NumbaHybridError(f"{args.file}: {exc}") from None
    first = c // 2
    print(f"{PROG}: perplexity over {n_chunk} chunks of {c} tokens ({len(tokens)} in the "
          f"file), scoring the last {c - 1 - first} of each, {n_seq} chunk(s) per batch "
          f"of at most {ub} tokens", file=sys.stderr)
    bar = Progress(n_chunk, "perplexity", unit="chunk")

    def on_chunk(i: int, ppl: float) -> None:
        bar.write(f"[{i}]{ppl:.4f},")
        bar.update(1, ppl=f"{ppl:.4f}")
        interrupt.check()

    try:
        result = perplexity(model, tokens, c, args.batch_size, args.ubatch_size, args.chunks,
                            on_chunk=on_chunk)
    finally:
        bar.close()
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    return 0


cmd_perplexity = deferring_interrupts(_perplexity)
