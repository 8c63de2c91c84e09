"""Gated DeltaNet: gates and the recurrent scan on the slot-indexed state.

Legend: T tokens, R runs, S slots, Hk/Hv key/value heads, Dk/Dv their dims, C conv channels
(q | k | v). The state of one value head is [Dv, Dk]: row j holds S[:, j], so both reads
(S k, S q) and the rank-1 update are contiguous over Dk. Parallel over (run, value head);
tokens of a run go in order, the state is read and written in place.
"""

from __future__ import annotations

import numpy as np

from .jit import helper, kernel, prange
from .simd import exp32


@kernel
def gates(b, a, dt_bias, ssm_a, beta, g):
    """beta = sigmoid(b); g = softplus(a + dt_bias) * ssm_a.   b, a, beta, g [T, Hv]."""
    for t in prange(b.shape[0]):
        for h in range(b.shape[1]):
            beta[t, h] = np.float32(1.0) / (np.float32(1.0) + exp32(-b[t, h]))
            z = a[t, h] + dt_bias[h]
            sp = z if z > 20.0 else np.log1p(np.exp(z))
            g[t, h] = sp * ssm_a[h]


@helper
def _l2_normalised(x, eps, scale, out):
    s = 0.0
    for i in range(x.size):
        s += np.float64(x[i]) * np.float64(x[i])
    r = np.float32(scale / np.sqrt(s + eps))
    for i in range(x.size):
        out[i] = x[i] * r


@kernel
def scan(qkv, beta, g, ssm, kq_map, hk, dk, eps, run_start, run_len, run_slot, out):
    """qkv [T, C] (after conv), beta, g [T, Hv], ssm [S, Hv, Dv, Dk], kq_map [Hv]
    -> out [T, Hv*Dv]. q and k are L2-normalised here; q also scaled by Dk^-0.5."""
    hv, dv = ssm.shape[1], ssm.shape[2]
    qscale = 1.0 / np.sqrt(dk)
    voff = 2 * hk * dk
    for task in prange(run_start.size * hv):
        r, h = task // hv, task % hv
        t0, n, slot = run_start[r], run_len[r], run_slot[r]
        kh = kq_map[h]
        q = np.empty(dk, np.float32)
        k = np.empty(dk, np.float32)
        s = ssm[slot, h]
        for t in range(t0, t0 + n):
            _l2_normalised(qkv[t, kh * dk:(kh + 1) * dk], eps, qscale, q)
            _l2_normalised(qkv[t, hk * dk + kh * dk:hk * dk + (kh + 1) * dk], eps, 1.0, k)
            decay = np.exp(g[t, h])
            bt = beta[t, h]
            kq = np.float32(0.0)
            for i in range(dk):
                kq += k[i] * q[i]
            for j in range(dv):
                row = s[j]
                sk = np.float32(0.0)
                sq = np.float32(0.0)
                for i in range(dk):
                    sk += row[i] * k[i]
                    sq += row[i] * q[i]
                # d = beta (v - S_decayed k);  o = S_new q = decay (S q) + (k.q) d
                d = bt * (qkv[t, voff + h * dv + j] - decay * sk)
                out[t, h * dv + j] = decay * sq + kq * d
                for i in range(dk):
                    row[i] = decay * row[i] + d * k[i]
