"""JIT options for every CPU kernel, in one place.

Kernels are cached on disk (``cache=True``, in a directory per version of the sources; see
below) so only the first run pays the compile time.
Fast-math is limited to re-association, FMA contraction and signed zeros: enough for
LLVM to vectorise reductions, while every lane still computes exactly what the source says.
The other fast-math flags (approximate functions and reciprocals, no-NaN/Inf) let a loop's
vector body and its scalar fallback round differently; LLVM picks between them at run time
from the arrays' addresses, which made results depend on the heap and broke bitwise batch
invariance. For the same reason no loop may both store to memory and accumulate a
reduction: such a loop is versioned, and the two versions sum in different orders.
In a kernel (parallel=True) every array constructor or whole-array expression outside a
prange (np.zeros, np.arange, ``a[:] = 0``) is a parallel loop of its own: a fork and a join
of the threads, more futex calls and, after a wait longer than the spin, a sleeping thread
to wake. A kernel should have one; its setup goes in ``serial`` functions.
Set ``NUMBA_HYBRID_SERIAL=1`` to build the kernels without threads (tests, debugging).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

PARALLEL = os.environ.get("NUMBA_HYBRID_SERIAL", "") not in ("1", "true", "yes")


def _sources_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(here.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# Numba keys a cached kernel by its own source file only, so a change in a module it inlines
# (the IR in simd.py, a helper elsewhere) would leave stale machine code in the cache. The
# kernels are therefore cached in a directory named after a digest of all the CPU sources:
# any change compiles afresh. NUMBA_CACHE_DIR, if set, is used as it is.
SOURCES_DIGEST = _sources_digest()
if not os.environ.get("NUMBA_CACHE_DIR"):
    _home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    numba.config.CACHE_DIR = str(_home / "numba_hybrid" / SOURCES_DIGEST)

FASTMATH = {"reassoc", "contract", "nsz"}

kernel = numba.njit(parallel=PARALLEL, fastmath=FASTMATH, cache=True, nogil=True)
helper = numba.njit(fastmath=FASTMATH, cache=True, nogil=True, inline="always")
serial = numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
prange = numba.prange
