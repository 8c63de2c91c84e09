"""Causal depthwise conv + SiLU on the slot-indexed conv state.

Legend: T tokens, R runs, S slots, C channels, Kc kernel width. The conv state of a slot is
[Kc-1, C], its last Kc-1 inputs, oldest first; it is updated in place. Parallel over
(run, channel block); time runs forward inside a run.
"""

from __future__ import annotations

import numpy as np

from .jit import kernel, prange
from .simd import exp32

CB = 256


@kernel
def causal_conv(x, w, conv_state, run_start, run_len, run_slot, out):
    """x, out [T, C] (grouped order); w [Kc, C] (the file's [C, Kc] transposed, so that
    the loops over channels are contiguous); conv_state [S, Kc-1, C]."""
    kc, C = w.shape
    nb = (C + CB - 1) // CB
    for task in prange(run_start.size * nb):
        r, b = task // nb, task % nb
        t0, n, slot = run_start[r], run_len[r], run_slot[r]
        c0, c1 = b * CB, min(C, b * CB + CB)
        st = conv_state[slot]
        y = np.empty(c1 - c0, np.float32)
        for t in range(n):
            y[:] = 0.0
            for j in range(kc):
                u = t + j                          # index into [window | run inputs]
                src = st[u, c0:c1] if u < kc - 1 else x[t0 + u - (kc - 1), c0:c1]
                wj = w[j, c0:c1]
                for c in range(c1 - c0):
                    y[c] += wj[c] * src[c]
            for c in range(c1 - c0):
                out[t0 + t, c0 + c] = y[c] / (np.float32(1.0) + exp32(-y[c]))
        # New window: the last Kc-1 entries of [window | inputs]; ascending i only reads
        # window rows not yet overwritten.
        for i in range(kc - 1):
            u = n + i
            for c in range(c0, c1):
                st[i, c] = st[u, c] if u < kc - 1 else x[t0 + u - (kc - 1), c]
