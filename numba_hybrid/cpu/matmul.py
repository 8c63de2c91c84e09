"""Quantised matrix multiplication: out[T, N] = x[T, K] @ W[N, K]^T.

Legend: T tokens, K row length (input features), N rows (outputs), RB rows per task.

Work is split over blocks of RB weight rows (``prange``); each block is dequantised once
into a thread-local float32 tile and then dotted with every token. Every output element is
one call of the same ``dot`` on the same two vectors whatever T is, so a token's result
does not depend on the rest of the batch (bitwise batch invariance).
"""

from __future__ import annotations

import numpy as np

from .dequant import dequant_row
from .jit import helper, kernel, prange

RB = 16


@helper
def dot(a, b):
    s = np.float32(0.0)
    for k in range(a.size):
        s += a[k] * b[k]
    return s


@kernel
def matmul(x, raw, qtype, out):
    """x [T, K] f32, raw uint8 [N, bytes_per_row] of GGML type ``qtype`` -> out [T, N]."""
    T, K = x.shape
    N = raw.shape[0]
    for b in prange((N + RB - 1) // RB):
        r0 = b * RB
        r1 = min(N, r0 + RB)
        w = np.empty((RB, K), np.float32)
        for r in range(r0, r1):
            dequant_row(raw[r], qtype, w[r - r0])
        for t in range(T):
            xt = x[t]
            for r in range(r0, r1):
                out[t, r] = dot(w[r - r0], xt)


@kernel
def gather_rows(raw, qtype, rows, out):
    """Dequantise the rows ``rows`` of a matrix (the token embedding lookup)."""
    for i in prange(rows.size):
        dequant_row(raw[rows[i]], qtype, out[i])
