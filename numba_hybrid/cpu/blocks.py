"""A layer's token mixer as one compiled call: the delta-net or the attention block of
forward.CpuBackend, for the integer layouts of fast precision.

A decode step runs each layer's kernels on one token, where the Python around them (the
dispatch of ~10 calls, their allocations and slicing) costs as much as some of the kernels;
here it is one call per block. The kernels are the ones the Python path calls, in the same
order on the same values, so the two give the same bits (tests/test_cpu_model.py).

The input projections are ``ws``: a tuple of weights (matmul.dense_product's form: panels,
or a tuple of Q8_0 matrices), one per run of matrices fused at load, in the order of the
names the block takes (forward.DELTANET_IN, ATTENTION_IN); ``kinds`` their type codes and
``widths`` their rows. Their outputs side by side are the named matrices' side by side.
"""

from __future__ import annotations

import numpy as np

from .attention import attention
from .conv import causal_conv
from .deltanet import gates, scan
from .jit import kernel, prange, serial
from .matmul import dense_product
from .norm import gated_rms_norm
from .quantize import quantized_int8


@serial
def project(h, act, ws, kinds, widths):
    """h [T, K] (quantised as ``act``) times each of the weights ws: a list of [T, width]."""
    q = quantized_int8(h, act)
    parts = []
    for i in range(len(ws)):
        part = np.empty((h.shape[0], widths[i]), np.float32)
        dense_product(q, ws[i], kinds[i], part)
        parts.append(part)
    return parts


@kernel
def _copy_columns(src, c0, out):
    """out [T, n] = src[:, c0:c0 + n], a row per task (numba's own copy of a column slice
    ran at 2-13 GB/s)."""
    for t in prange(out.shape[0]):
        for c in range(out.shape[1]):
            out[t, c] = src[t, c0 + c]


@serial
def take(parts, widths, c0, c1):
    """Columns c0..c1 of the products' outputs side by side, as a C-contiguous array: the
    product itself where they are all of one product's, else a copy (a fused run of
    products never splits a matrix, so one product holds them)."""
    start = 0
    for i in range(len(parts)):
        if c1 <= start + widths[i]:
            if c0 == start and c1 == start + widths[i]:
                return parts[i]
            out = np.empty((parts[i].shape[0], c1 - c0), np.float32)
            _copy_columns(parts[i], c0 - start, out)
            return out
        start += widths[i]
    raise ValueError("columns beyond the products")


@serial
def deltanet_block(h, act, ws, kinds, widths, n_qkv, n_z, n_b, dt_bias, ssm_a, conv_w,
                   conv_state, ssm, kq_map, hk, dk, l2_eps, run_start, run_len, run_slot,
                   norm_w, eps, w_out, kind_out, act_out, out):
    """out [T, H] = the delta-net block of h [T, H] (forward.CpuBackend.deltanet): its
    projections [qkv | z | b | a] (n_qkv, n_z, n_b columns, a the rest), the gates, the
    causal conv and the scan on the slots' states (updated in place), the gated norm and
    the output projection w_out (its input quantised as act_out)."""
    parts = project(h, act, ws, kinds, widths)
    e1, e2, e3 = n_qkv, n_qkv + n_z, n_qkv + n_z + n_b
    qkv = take(parts, widths, 0, e1)
    z = take(parts, widths, e1, e2)
    beta = take(parts, widths, e2, e3)
    g = take(parts, widths, e3, np.sum(np.array(widths)))
    gates(beta, g, dt_bias, ssm_a, beta, g)
    T = h.shape[0]
    c = np.empty((T, qkv.shape[1]), np.float32)
    causal_conv(qkv, conv_w, conv_state, run_start, run_len, run_slot, c)
    o = np.empty((T, ssm.shape[1] * ssm.shape[2]), np.float32)
    scan(c, beta, g, ssm, kq_map, hk, dk, l2_eps, run_start, run_len, run_slot, o)
    y = np.empty((T, o.shape[1]), np.float32)
    gated_rms_norm(o, z, norm_w, eps, y)
    dense_product(quantized_int8(y, act_out), w_out, kind_out, out)


@serial
def attention_block(h, act, ws, kinds, widths, n_q, n_k, q_norm, k_norm, eps, inv_freq,
                    k_cache, v_cache, positions, run_len, run_slot, w_out, kind_out, act_out,
                    out):
    """out [T, H] = the attention block of h [T, H] (forward.CpuBackend.attention): its
    projections [q and gate | k | v] (n_q, n_k columns, v the rest), attention over the
    slots' caches (the tokens' keys and values stored in them), the output projection."""
    parts = project(h, act, ws, kinds, widths)
    qg = take(parts, widths, 0, n_q)
    k = take(parts, widths, n_q, n_q + n_k)
    v = take(parts, widths, n_q + n_k, np.sum(np.array(widths)))
    tok_slot = np.empty(h.shape[0], np.int64)
    t = 0
    for r in range(run_len.size):
        tok_slot[t:t + run_len[r]] = run_slot[r]
        t += run_len[r]
    o = np.empty((h.shape[0], qg.shape[1] // 2), np.float32)     # qg: [query | gate]
    attention(qg, k, v, q_norm, k_norm, eps, inv_freq, k_cache, v_cache, positions, tok_slot,
              o)
    dense_product(quantized_int8(o, act_out), w_out, kind_out, out)
