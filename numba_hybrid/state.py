"""StatePool: the slot-indexed recurrent state and KV cache shared by every backend.

One slot holds one sequence. Per layer l (S = n_slots):

| buffer   | layers     | shape                     |
|----------|------------|---------------------------|
| conv[l]  | recurrent  | [S, Kc-1, C], oldest row first (the last Kc-1 conv inputs) |
| ssm[l]   | recurrent  | [S, Hv, Dv, Dk] (each row of a head is contiguous over Dk) |
| k[l]     | attention  | [S, n_ctx, nkv, hd]       |
| v[l]     | attention  | [S, n_ctx, nkv, hd]       |

``pos[s]`` is the last position stored in slot s (-1: empty). The buffers are allocated
once and never reallocated; kernels update a slot's rows in place.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import BatchError, NumbaHybridError
from .models import ModelArgs


class StatePool:
    def __init__(self, args: ModelArgs, n_slots: int, n_ctx: int,
                 dtype=np.float32, kv_dtype=np.float32, xp=np):
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.args = args
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        a = args
        S = n_slots
        conv_shape = (S, a.ssm_conv_kernel - 1, a.conv_channels)
        ssm_shape = (S, a.ssm_v_heads, a.ssm_v_dim, a.ssm_k_dim)
        kv_shape = (S, n_ctx, a.n_head_kv, a.head_dim)
        # Size the pool before allocating it: an absurd n_ctx/n_slots (or hyper-parameter)
        # must be one clear error, not a MemoryError -- or, with overcommit, a lazily
        # mapped array that gets the process OOM-killed once it is touched.
        need = (len(a.recurrent_layers) * np.dtype(dtype).itemsize
                * (math.prod(conv_shape) + math.prod(ssm_shape))
                + len(a.attention_layers) * 2 * np.dtype(kv_dtype).itemsize
                * math.prod(kv_shape))
        what = (f"the state for {S} slot(s) x {n_ctx} positions needs "
                f"{need / 2**30:.1f} GiB")
        ram = _physical_memory() if xp is np else None
        if ram is not None and need > ram:
            raise NumbaHybridError(f"{what}, more than this machine's {ram / 2**30:.1f} GiB "
                                   f"of memory; lower n_ctx or n_slots")
        try:
            self.conv = {l: xp.zeros(conv_shape, dtype) for l in a.recurrent_layers}
            self.ssm = {l: xp.zeros(ssm_shape, dtype) for l in a.recurrent_layers}
            self.k = {l: xp.zeros(kv_shape, kv_dtype) for l in a.attention_layers}
            self.v = {l: xp.zeros(kv_shape, kv_dtype) for l in a.attention_layers}
        except MemoryError:
            raise NumbaHybridError(f"{what}, which cannot be allocated; lower n_ctx or "
                                   f"n_slots") from None
        self.pos = np.full(S, -1, dtype=np.int64)

    def buffers(self):
        """Every state array, in a fixed order (for snapshots and comparisons)."""
        for group in (self.conv, self.ssm, self.k, self.v):
            for l in sorted(group):
                yield group[l]

    def check_slot(self, slot: int) -> int:
        if not (0 <= int(slot) < self.n_slots):
            raise BatchError(f"sequence id {slot} is outside 0..{self.n_slots - 1}")
        return int(slot)

    def clear(self, slot: int) -> None:
        """Forget a slot: zero its recurrent state and mark it empty. Its KV rows are left
        as they are: a sequence starting in the slot writes position p before anything
        reads it, and attention reads positions 0..p only."""
        slot = self.check_slot(slot)
        for group in (self.conv, self.ssm):
            for buf in group.values():
                buf[slot] = 0
        self.pos[slot] = -1

    def snapshot(self, slot: int) -> dict:
        """A copy of everything slot ``slot`` holds (KV only up to its position)."""
        slot = self.check_slot(slot)
        n = int(self.pos[slot]) + 1
        return {
            "pos": int(self.pos[slot]),
            "conv": {l: b[slot].copy() for l, b in self.conv.items()},
            "ssm": {l: b[slot].copy() for l, b in self.ssm.items()},
            "k": {l: b[slot, :n].copy() for l, b in self.k.items()},
            "v": {l: b[slot, :n].copy() for l, b in self.v.items()},
        }

    def restore(self, slot: int, snap: dict) -> None:
        slot = self.check_slot(slot)
        n = snap["pos"] + 1
        if n > self.n_ctx:
            raise BatchError(f"snapshot holds {n} positions, the pool has n_ctx {self.n_ctx}")
        for name in ("conv", "ssm"):
            for l, b in getattr(self, name).items():
                b[slot] = snap[name][l]
        for name in ("k", "v"):
            for l, b in getattr(self, name).items():
                b[slot, :n] = snap[name][l]
        self.pos[slot] = snap["pos"]

    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in self.buffers()))


def _physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
