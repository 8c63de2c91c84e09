"""Mixture of experts: router, top-k, and expert matmuls grouped by expert.

Legend: T tokens, H hidden, E experts, k experts per token, P = T*k (token, rank) pairs,
Fe expert width, RB rows per task. Pairs are sorted by expert so each expert's weights are
read once per step; each pair's output is kept apart and the k outputs of a token are summed
in rank order, so a token's result does not depend on which other tokens chose its experts.
"""

from __future__ import annotations

import numpy as np
from numba.core import types
from numba.extending import overload

from . import panels, rows
from .dequant import dequant_row
from .jit import kernel, prange, serial
from .matmul import RB, dense_product, dot, dot_i8, dot_q4, matmul
from .norm import swiglu_halves
from .quantize import quantized_int8
from .simd import exp32


@kernel
def route(logits, k, experts, weights):
    """Softmax over E logits, top-k (ties to the lower index), renormalised.
    logits [T, E] -> experts [T, k] int64, weights [T, k]."""
    T, E = logits.shape
    for t in prange(T):
        m = logits[t, 0]
        for e in range(E):
            if logits[t, e] > m:
                m = logits[t, e]
        p = np.empty(E, np.float32)
        s = np.float32(0.0)
        for e in range(E):
            p[e] = exp32(logits[t, e] - m)
        for e in range(E):
            s += p[e]
        for e in range(E):
            p[e] /= s
        taken = np.zeros(E, np.bool_)
        tot = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or p[e] > p[best]):
                    best = e
            taken[best] = True
            experts[t, j] = best
            weights[t, j] = p[best]
            tot += p[best]
        tot = max(tot, np.float32(6.103515625e-5))
        for j in range(k):
            weights[t, j] /= tot


@kernel
def expert_matmul(x, src, raw, qtype, exp_start, tasks, out):
    """For every pair p of expert e (pairs exp_start[e]..exp_start[e+1]):
    out[p, :] = W_e @ x[src[p]].  raw uint8 [E, N, bytes_per_row]; tasks [n, 2] lists the
    (expert, row block) pairs that have work."""
    K = x.shape[1]
    N = raw.shape[1]
    for i in prange(tasks.shape[0]):
        e, b = tasks[i, 0], tasks[i, 1]
        r0 = b * RB
        r1 = min(N, r0 + RB)
        w = np.empty((RB, K), np.float32)
        for r in range(r0, r1):
            dequant_row(raw[e, r], qtype, w[r - r0])
        for p in range(exp_start[e], exp_start[e + 1]):
            xp = x[src[p]]
            for r in range(r0, r1):
                out[p, r] = dot(w[r - r0], xp)


@kernel
def combine(y, pair_of, weights, out):
    """out[t] += sum_j weights[t, j] * y[pair_of[t, j]], ranks in order.  y [P, H]."""
    T, k = weights.shape
    for t in prange(T):
        s = np.zeros(out.shape[1], np.float32)
        for j in range(k):
            wj, yj = weights[t, j], y[pair_of[t, j]]
            for i in range(s.size):
                s[i] += wj * yj[i]
        for i in range(s.size):
            out[t, i] += s[i]


@kernel
def shared_gate(x, w, y, out):
    """out[t] += sigmoid(w . x[t]) * y[t].   x [T, H], w [H], y, out [T, H]."""
    for t in prange(x.shape[0]):
        s = np.float32(0.0)
        for i in range(x.shape[1]):
            s += w[i] * x[t, i]
        gt = np.float32(1.0) / (np.float32(1.0) + exp32(-s))
        for i in range(out.shape[1]):
            out[t, i] += gt * y[t, i]


@serial
def group_pairs(experts, n_expert):
    """Sort the (token, rank) pairs by expert, stably (a counting sort). Returns the token
    of each sorted pair, exp_start [E+1], the sorted position of each (t, j) [T, k], and
    the count of pairs per expert."""
    T, k = experts.shape
    counts = np.zeros(n_expert, np.int64)
    for t in range(T):
        for j in range(k):
            counts[experts[t, j]] += 1
    exp_start = np.zeros(n_expert + 1, np.int64)
    for e in range(n_expert):
        exp_start[e + 1] = exp_start[e] + counts[e]
    fill = exp_start[:n_expert].copy()
    src = np.empty(T * k, np.int64)
    pair_of = np.empty((T, k), np.int64)
    for t in range(T):
        for j in range(k):
            e = experts[t, j]
            src[fill[e]] = t
            pair_of[t, j] = fill[e]
            fill[e] += 1
    return src, exp_start, pair_of, counts


@serial
def tasks_for(counts, n_rows, block):
    """(expert, row block) tasks for the experts with tokens: blocks of ``block`` rows
    (or of panels) out of ``n_rows``."""
    nb = (n_rows + block - 1) // block
    used = 0
    for e in range(counts.size):
        used += counts[e] > 0
    tasks = np.empty((used * nb, 2), np.int64)
    i = 0
    for e in range(counts.size):
        if counts[e] > 0:
            for b in range(nb):
                tasks[i, 0] = e
                tasks[i, 1] = b
                i += 1
    return tasks


@serial
def task_list(counts, n, kind):
    """tasks_for an expert matrix of n rows (kind < 0) or n panels of panel type kind,
    with the block its kernel takes: (tasks, rows or panels per task)."""
    block = RB if kind < 0 else panels.tile(kind, counts.max())[0]
    return tasks_for(counts, n, block), block


@kernel
def expert_matmul_i8(x, src, qs, d, shift, exp_start, tasks, out):
    """expert_matmul for experts repacked to int8 values (Q8_0, Q6_K): qs int8 [E, N, K],
    d [E, N, K >> shift]."""
    N = qs.shape[1]
    for i in prange(tasks.shape[0]):
        e, b = tasks[i, 0], tasks[i, 1]
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for r in range(r0, r1):
            q, dr = qs[e, r], d[e, r]
            for p in range(exp_start[e], exp_start[e + 1]):
                out[p, r] = dot_i8(q, dr, shift, x[src[p]])


@kernel
def expert_matmul_q4(xl, xh, sl, sh, src, qs, dlo, dhi, mlo, mhi, shift, exp_start, tasks, out):
    """expert_matmul for repacked Q4_0/Q4_1/Q4_K experts ([E, N, ...] arrays of
    matmul.repack_q4_*) on split activations (matmul.split_q4_activations)."""
    N = qs.shape[1]
    for i in prange(tasks.shape[0]):
        e, b = tasks[i, 0], tasks[i, 1]
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for r in range(r0, r1):
            for p in range(exp_start[e], exp_start[e + 1]):
                t = src[p]
                out[p, r] = dot_q4(qs[e, r], dlo[e, r], dhi[e, r], mlo[e, r], mhi[e, r], shift,
                                   xl[t], xh[t], sl[t], sh[t])


# precision="fast": 8-bit activations (quantize.quantize_int8) times experts in panels
# (panels.py); a task is one expert's group of panels, over that expert's tokens.

@kernel
def expert_matmul_panels(x, xd, n16, n32, src, wp, kind, gp, exp_start, tasks, out):
    """expert_matmul for experts in panels (wp uint8 [E, G, bytes]), on 8-bit activations;
    (tasks, gp) from task_list(counts, G, kind), gp panels per task."""
    G = wp.shape[1]
    tp = panels.tile(kind, 2)[1]
    for i in prange(tasks.shape[0]):
        e, b = tasks[i, 0], tasks[i, 1]
        p0, p1 = exp_start[e], exp_start[e + 1]
        g0 = b * gp
        ng = min(gp, G - g0)
        for i0 in range(p0, p1, tp):
            panels.panel_tile(kind, wp[e], x, xd, n16, n32, src, i0, min(tp, p1 - i0), g0, ng,
                              out)


@kernel
def expert_matmul_q8_0_rows(x, xd, n16, n32, src, ws, exp_start, tasks, out):
    """expert_matmul for Q8_0 experts in the file's layout, on 8-bit activations: ws a
    tuple of uint8 [E, N_m, 34 K/32] whose rows are stacked (matmul.matmul_q8_0_rows);
    tasks from task_list(counts, sum of N_m, -1)."""
    acts = rows.q8_0_activations(x, xd)
    N = out.shape[1]
    for i in prange(tasks.shape[0]):
        e, b = tasks[i, 0], tasks[i, 1]
        p0, p1 = exp_start[e], exp_start[e + 1]
        r0 = b * RB
        r1 = min(N, r0 + RB)
        for i0 in range(p0, p1, rows.TOKENS):
            nt = min(rows.TOKENS, p1 - i0)
            start = 0
            for m in range(len(ws)):
                start = rows.stacked(ws[m][e], start, acts, src, i0, nt, r0, r1, out)


# One MoE feed-forward block as a single compiled call, for the layouts of fast precision:
# a float router, the experts' gate and up fused into one product and their down, in panels
# or in Q8_0 rows, and a shared expert likewise (or none). The Python part of a decode step
# (allocations, and the dispatch of ~15 calls) is then one call. A weight is passed as
# (w, kind): panels and their type code, or a tuple of Q8_0 matrices whose rows are stacked
# (forward.QWeight.rows) and -1; experts_product below and matmul.dense_product compile to
# the kernel for each.

def experts_product(q, src, w, kind, exp_start, counts, out):
    """out[p] = the expert of pair p (exp_start) times the activations q[src[p]]."""
    raise NotImplementedError("compiled only (overload below)")


@overload(experts_product, jit_options={"cache": True})
def _experts_product(q, src, w, kind, exp_start, counts, out):
    if isinstance(w, types.BaseTuple):
        def rows_impl(q, src, w, kind, exp_start, counts, out):
            tasks = task_list(counts, out.shape[1], kind)[0]
            expert_matmul_q8_0_rows(q[0], q[1], q[2], q[3], src, w, exp_start, tasks, out)
        return rows_impl

    def panels_impl(q, src, w, kind, exp_start, counts, out):
        tasks, gp = task_list(counts, w.shape[1], kind)
        expert_matmul_panels(q[0], q[1], q[2], q[3], src, w, kind, gp, exp_start, tasks, out)
    return panels_impl


@serial
def moe_block(h, hq, router, router_qtype, k, gu, gu_kind, n_gu, down, down_kind, down_act,
              shared, sh_gu, sh_gu_kind, n_sh, sh_down, sh_down_kind, sh_act, sh_gate, out):
    """out [T, H] = the MoE block of h [T, H], as forward.CpuBackend.ffn computes it. hq: h
    quantised for the experts' gate|up (n_gu = 2 Fe rows); down: H rows, taking its input
    quantised as down_act; sh_*: the shared expert's (used if ``shared``), gated by
    sigmoid(sh_gate . h)."""
    T, H = h.shape
    E = router.shape[0]
    logits = np.empty((T, E), np.float32)
    matmul(h, router, router_qtype, logits)
    experts = np.empty((T, k), np.int64)
    weights = np.empty((T, k), np.float32)
    route(logits, k, experts, weights)
    src, exp_start, pair_of, counts = group_pairs(experts, E)
    P = T * k
    both = np.empty((P, n_gu), np.float32)
    experts_product(hq, src, gu, gu_kind, exp_start, counts, both)
    gate = np.empty((P, n_gu // 2), np.float32)
    swiglu_halves(both, gate)
    y = np.empty((P, H), np.float32)
    experts_product(quantized_int8(gate, down_act), np.arange(P), down, down_kind, exp_start,
                    counts, y)
    out[:] = 0
    combine(y, pair_of, weights, out)
    if shared:
        both = np.empty((T, n_sh), np.float32)
        dense_product(hq, sh_gu, sh_gu_kind, both)
        act = np.empty((T, n_sh // 2), np.float32)
        swiglu_halves(both, act)
        ys = np.empty((T, H), np.float32)
        dense_product(quantized_int8(act, sh_act), sh_down, sh_down_kind, ys)
        shared_gate(h, sh_gate, ys, out)
