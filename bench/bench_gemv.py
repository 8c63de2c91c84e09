"""Quantised GEMV / GEMM throughput of the CPU matmul kernels, as the backend runs them
(through their load-time repacking: Q8_0, Q6_K, Q4_0, Q4_1 and Q4_K in "exact" precision,
Q6_K and Q4_K in "fast"; Q8_0 in "fast" read in place; other types through the generic
kernel).

For each weight type and precision: check the kernel against the float64 product
(refuses to time a wrong kernel), then time y = W x for one token (GEMV: GB/s counted at
the GGUF size of the weights, and % of the memory bandwidth) and for T = 512 tokens
(GFLOP/s). The memory bandwidth of a VM moves by up to 2x from minute to minute, so it is
measured beside the kernel: rounds of a streaming read over float32 buffers as large as
the weights, then the GEMV over as many weight copies; % is the median of the rounds'
ratios, and each GB/s the median over rounds. "exact" multiplies float32 activations;
"fast" quantises them to 8-bit blocks (the time of that is included) and runs the integer
kernels for Q8_0, Q6_K and Q4_K on their own layouts (other types multiply the rounded
activations in float32). Prints a table.

    python bench/bench_gemv.py [--rows 4096] [--cols 4096] [--types Q8_0,Q4_K,Q6_K,Q4_0]
                               [--precision exact,fast]
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np
from gguf import GGMLQuantizationType as QT

import common
from numba_hybrid.cpu.forward import linear, linear_int, qweight, quantize
from numba_hybrid.quants import ACT_NONE, activation_kind, dequantize, round_activations


ROUNDS = 9


class _Tensor:
    def __init__(self, raw, qtype, ne):
        self.data, self.qtype, self.ne, self.name = raw, qtype, ne, "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--types", default="Q8_0,Q4_K,Q6_K,Q4_0")
    ap.add_argument("--tokens", type=int, default=512, help="T for the GEMM column")
    ap.add_argument("--precision", default="exact,fast")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"# {datetime.date.today()}  {common.machine()}")
    print(f"# W is {args.rows} x {args.cols}; bandwidth measured beside each GEMV")
    print(f"{'type':6} {'prec':5} {'GEMV us':>9} {'GB/s':>7} {'bw GB/s':>8} {'% bw':>6} "
          f"{'GEMM T':>7} {'GFLOP/s':>8}")
    n_copies = max(2, int(2 * 2**30 // (args.rows * args.cols)))   # beat the caches
    for name in args.types.split(","):
        qt = QT[name]
        raws = [common.random_quant_matrix(qt, args.rows, args.cols, rng)
                for _ in range(min(n_copies, 8))]
        layouts = {p: [qweight(_Tensor(r, qt, (args.cols, args.rows)), fast=p == "fast")
                       for r in raws] for p in args.precision.split(",")}
        probe = [np.ones(r.nbytes // 4, np.float32) for r in raws]   # the same bytes
        x = rng.standard_normal((1, args.cols)).astype(np.float32)
        xt = rng.standard_normal((args.tokens, args.cols)).astype(np.float32)
        w64 = dequantize(raws[0], qt).astype(np.float64)
        for precision, mats in layouts.items():
            act = activation_kind(qt) if precision == "fast" else ACT_NONE

            def run(xa, w, out):
                if w.int_kernel:
                    linear_int(quantize(xa, act), w, out)
                else:
                    linear(round_activations(xa, act) if act != ACT_NONE else xa, w, out)

            out = np.empty((1, args.rows), np.float32)
            run(x, mats[0], out)
            ref = round_activations(x, act).astype(np.float64) @ w64.T
            err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            if not err < 1e-5:
                raise SystemExit(f"{name} {precision}: kernel disagrees with the reference "
                                 f"(rel {err:.2e})")
            i = [0]

            def gemv():
                i[0] = (i[0] + 1) % len(mats)
                run(x, mats[i[0]], out)

            def stream():
                i[0] = (i[0] + 1) % len(probe)
                common.stream_sum(probe[i[0]])

            times, bws = [], []
            for _ in range(ROUNDS):
                bws.append(probe[0].nbytes / common.median_time(stream, repeat=16) / 1e9)
                times.append(common.median_time(gemv, repeat=16))
            gb = np.array([raws[0].nbytes / t / 1e9 for t in times])
            t, gbs, bw = float(np.median(times)), float(np.median(gb)), float(np.median(bws))
            share = float(np.median(gb / np.array(bws)))
            outt = np.empty((args.tokens, args.rows), np.float32)
            tt = common.median_time(lambda: run(xt, mats[0], outt), repeat=3, warmup=1)
            gflops = 2 * args.tokens * args.rows * args.cols / tt / 1e9
            print(f"{name:6} {precision:5} {t * 1e6:9.0f} {gbs:7.1f} {bw:8.1f} {100 * share:6.1f} "
                  f"{args.tokens:7d} {gflops:8.1f}", flush=True)


if __name__ == "__main__":
    main()
