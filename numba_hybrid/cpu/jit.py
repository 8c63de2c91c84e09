"""JIT options for every CPU kernel, in one place.

Kernels are cached on disk (``cache=True``) so only the first run pays the compile time.
``fastmath`` lets LLVM vectorise reductions; batch invariance still holds because every
token's dot products go through the same compiled loop whatever the batch holds.
Set ``NUMBA_HYBRID_SERIAL=1`` to build the kernels without threads (tests, debugging).
"""

from __future__ import annotations

import os

import numba

PARALLEL = os.environ.get("NUMBA_HYBRID_SERIAL", "") not in ("1", "true", "yes")

kernel = numba.njit(parallel=PARALLEL, fastmath=True, cache=True, nogil=True)
helper = numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
serial = numba.njit(fastmath=True, cache=True, nogil=True)
prange = numba.prange
