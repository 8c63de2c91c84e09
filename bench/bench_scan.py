"""Gated delta-net scan throughput (tokens per second per layer) at Qwen3.5-35B-A3B's shape.

Checks the kernel against the float64 reference on a short run first, then times a
prefill of T tokens in one sequence and a decode step of R sequences, and prints the
bytes of state each decode step must read and write (the scan's memory floor).

    python bench/bench_scan.py [--hk 16 --hv 32 --dk 128 --dv 128] [-T 512] [-R 8]
"""

from __future__ import annotations

import argparse
import datetime

import numpy as np

import common
from numba_hybrid.batch import plan_batch
from numba_hybrid.cpu import deltanet as dn
from numba_hybrid.reference import ops


def inputs(T, hk, hv, dk, dv, rng):
    C = 2 * hk * dk + hv * dv
    qkv = rng.standard_normal((T, C)).astype(np.float32)
    beta = rng.uniform(0.1, 0.9, (T, hv)).astype(np.float32)
    g = -rng.uniform(0.01, 1.0, (T, hv)).astype(np.float32)
    return qkv, beta, g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hk", type=int, default=16)
    ap.add_argument("--hv", type=int, default=32)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("-T", type=int, default=512, help="prefill tokens")
    ap.add_argument("-R", type=int, default=8, help="sequences decoding together")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    kq = (np.arange(a.hv) % a.hk).astype(np.int64)

    # correctness first, on 9 tokens
    qkv, beta, g = inputs(9, a.hk, a.hv, a.dk, a.dv, rng)
    plan = plan_batch(np.zeros(9, int), np.arange(9), np.zeros(9, int), None,
                      np.full(1, -1), 16, 1)
    ssm = np.zeros((1, a.hv, a.dv, a.dk), np.float32)
    out = np.empty((9, a.hv * a.dv), np.float32)
    dn.scan(qkv, beta, g, ssm, kq, a.hk, a.dk, 1e-6, plan.run_start, plan.run_len,
            plan.run_slot, out)
    hkd = a.hk * a.dk
    q = ops.l2_norm(qkv[:, :hkd].reshape(9, a.hk, a.dk).astype(np.float64), 1e-6) / np.sqrt(a.dk)
    k = ops.l2_norm(qkv[:, hkd:2 * hkd].reshape(9, a.hk, a.dk).astype(np.float64), 1e-6)
    v = qkv[:, 2 * hkd:].reshape(9, a.hv, a.dv).astype(np.float64)
    ref = ops.deltanet_scan(q, k, v, g, beta, np.zeros((1, a.hv, a.dv, a.dk)), kq, plan)
    err = np.linalg.norm(out - ref.reshape(9, -1)) / np.linalg.norm(ref)
    if not err < 1e-4:
        raise SystemExit(f"scan disagrees with the reference (rel {err:.2e})")

    print(f"# {datetime.date.today()}  {common.machine()}")
    print(f"# Hk={a.hk} Hv={a.hv} Dk={a.dk} Dv={a.dv}; state {a.hv * a.dv * a.dk * 4 / 2**20:.1f} "
          f"MiB per sequence per layer")
    qkv, beta, g = inputs(a.T, a.hk, a.hv, a.dk, a.dv, rng)
    out = np.empty((a.T, a.hv * a.dv), np.float32)
    ssm = np.zeros((1, a.hv, a.dv, a.dk), np.float32)
    one = (np.array([0]), np.array([a.T]), np.array([0]))
    t = common.median_time(lambda: dn.scan(qkv, beta, g, ssm, kq, a.hk, a.dk, 1e-6, *one, out),
                           repeat=5, warmup=1)
    print(f"prefill, 1 sequence x {a.T} tokens: {a.T / t:10.0f} tokens/s per layer")
    qkv, beta, g = inputs(a.R, a.hk, a.hv, a.dk, a.dv, rng)
    ssm = np.zeros((a.R, a.hv, a.dv, a.dk), np.float32)
    out = np.empty((a.R, a.hv * a.dv), np.float32)
    runs = (np.arange(a.R), np.ones(a.R, np.int64), np.arange(a.R))
    t = common.median_time(lambda: dn.scan(qkv, beta, g, ssm, kq, a.hk, a.dk, 1e-6, *runs, out),
                           repeat=50)
    moved = 2 * ssm.nbytes
    print(f"decode, {a.R} sequences x 1 token: {a.R / t:10.0f} tokens/s per layer "
          f"({moved / t / 1e9:.1f} GB/s of state read+written)")


if __name__ == "__main__":
    main()
