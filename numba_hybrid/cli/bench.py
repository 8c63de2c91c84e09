"""``numba-hybrid bench``: prompt processing and generation speed against context depth,
and aggregate generation speed with N parallel sequences."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import NumbaHybridError
from .common import (PROG, DeferredInterrupt, deferring_interrupts, Progress,
                     _add_runtime_arguments, _positive_int, _table)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("--depths", type=_depth_list, default=[0, 512, 2048], metavar="D,D,...",
                   help="context depths at which to time prompt processing and generation "
                        "(default: 0,512,2048)")
    p.add_argument("-np", "--parallel", type=_positive_list, default=[1, 2, 4, 8],
                   metavar="N,N,...",
                   help="numbers of parallel sequences for the aggregate generation speed "
                        "(default: 1,2,4,8)")
    p.add_argument("-ub", "--ubatch-size", type=_positive_int, default=512, metavar="N",
                   help="prompt tokens processed in one timed step at each depth "
                        "(default: %(default)s)")
    p.add_argument("-n", "--n-gen", type=_positive_int, default=32, metavar="N",
                   help="tokens generated per timing (default: %(default)s)")
    p.add_argument("-npp", "--n-prompt", type=_positive_int, default=32, metavar="N",
                   help="prompt tokens of each parallel sequence before its generation is "
                        "timed (default: %(default)s)")
    p.add_argument("-r", "--repetitions", type=_positive_int, default=3, metavar="N",
                   help="repeat each timing N times; the table shows mean and standard "
                        "deviation (default: %(default)s)")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="also draw the results to this PNG (needs matplotlib: "
                        "pip install 'numba-hybrid[bench]')")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check, before timing, that parallel sequences decode "
                        "exactly as alone")


def _bench(args: argparse.Namespace, interrupt: DeferredInterrupt) -> int:
    from ..engine import bench
    from ..engine.parallel import builtin_prompts, parallel_check
    from . import _load  # on the package, at call time: see numba_hybrid.cli

    if args.plot is not None:
        # Fail before the long work, not after it.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise NumbaHybridError("--plot needs matplotlib: pip install "
                                   "'numba-hybrid[bench]'") from None
    depths, nps = args.depths, args.parallel
    n_ctx = bench.needed_ctx(depths, args.ubatch_size, args.n_gen, args.n_prompt)
    model = _load(args, max(nps), n_ctx)
    interrupt.check()
    name = os.path.basename(model.path)
    print(f"{PROG}: bench {name}, {model.device} backend, {args.precision} precision, "
          f"{_threads_in_use()} threads", file=sys.stderr)
    bench.warm_up(model, args.ubatch_size, max(nps))
    interrupt.check()
    if not args.no_check:
        n = max(nps)
        report = parallel_check(model, builtin_prompts(n), n_predict=4,
                                on_progress=interrupt.checking(lambda: None))
        if not report.ok:
            raise NumbaHybridError(f"refusing to time: {n} parallel sequences do not decode "
                                   f"as they do alone (run '{PROG} parallel -np {n}')")
    r = args.repetitions
    bar = Progress(r * (len(depths) + len(nps)), "bench")
    try:
        step = interrupt.checking(bar.update)
        sweep = bench.sweep(model, depths, args.ubatch_size, args.n_gen, r, on_progress=step)
        par = bench.parallel_generation(model, nps, args.n_gen, args.n_prompt,
                                        args.ubatch_size, r, on_progress=step)
    finally:
        bar.close()

    def speed(n: int, t) -> str:
        s = f"{n / t.mean:.2f}"
        return s + (f" ± {n * t.std / t.mean ** 2:.2f}" if r > 1 else "")

    print(f"prompt processing (PP) and generation (TG) at depth N_KV, slot 0, {r} run(s) each")
    print("\n".join(_table(
        [(row.n_pp, row.n_tg, row.depth, f"{row.t_pp.mean:.3f}", speed(row.n_pp, row.t_pp),
          f"{row.t_tg.mean:.3f}", speed(row.n_tg, row.t_tg)) for row in sweep],
        ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s"), left=())))
    print()
    print(f"generation with N parallel sequences ({args.n_prompt}-token prompts, "
          f"{args.n_gen} tokens each)")
    base = par[0].speed if par and par[0].n_parallel == 1 else None
    print("\n".join(_table(
        [(row.n_parallel, row.n_tokens, f"{row.t.mean:.3f}", speed(row.n_tokens, row.t),
          f"{row.speed_per_seq:.2f}", f"{row.speed / base:.2f}x" if base else "-")
         for row in par],
        ("NP", "tokens", "T s", "S t/s (all)", "S t/s (per seq)", "vs NP=1"), left=())))
    if args.plot is not None:
        bench.plot(sweep, par, args.plot, title=f"{name} ({model.device}, {args.precision})")
        print(f"{PROG}: plot written to {args.plot}", file=sys.stderr)
    return 0


cmd_bench = deferring_interrupts(_bench)


def _threads_in_use() -> int:
    import numba

    return numba.get_num_threads()


# ---- argument types ------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: "
                                         f"{text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def _depth_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"depths must be 0 or more, got {min(values)}")
    return values


def _positive_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be at least 1, got {min(values)}")
    return values
