"""JIT options for every CPU kernel, in one place.

Kernels are cached on disk (``cache=True``) so only the first run pays the compile time.
Fast-math is limited to re-association, FMA contraction and signed zeros: enough for
LLVM to vectorise reductions, while every lane still computes exactly what the source says.
The other fast-math flags (approximate functions and reciprocals, no-NaN/Inf) let a loop's
vector body and its scalar fallback round differently; LLVM picks between them at run time
from the arrays' addresses, which made results depend on the heap and broke bitwise batch
invariance. For the same reason no loop may both store to memory and accumulate a
reduction: such a loop is versioned, and the two versions sum in different orders.
Set ``NUMBA_HYBRID_SERIAL=1`` to build the kernels without threads (tests, debugging).
"""

from __future__ import annotations

import os

import numba

PARALLEL = os.environ.get("NUMBA_HYBRID_SERIAL", "") not in ("1", "true", "yes")

FASTMATH = {"reassoc", "contract", "nsz"}

kernel = numba.njit(parallel=PARALLEL, fastmath=FASTMATH, cache=True, nogil=True)
helper = numba.njit(fastmath=FASTMATH, cache=True, nogil=True, inline="always")
serial = numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
prange = numba.prange
