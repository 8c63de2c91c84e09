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

A kernel loaded from the cache keeps its LLVM IR only as bitcode; see
``lean_cached_kernels``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
import llvmlite.binding as llvm
from numba.core import codegen as _codegen

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


def lean_cached_kernels() -> bool:
    """Keep a cached kernel's IR as bitcode until something links against it.

    Numba loads a cached kernel as machine code plus the bitcode of its IR, and parses that
    bitcode into an LLVM module held for as long as the kernel lives: the module is only
    read when a kernel compiled later calls this one (it is linked into the caller). Parsed,
    the IR takes 12-18x the bitcode's size: on the Q4_K_M bench model the 25 kernels that
    decoding and prefill load hold 5.8 MB of bitcode and 2.6 MB of machine code, and their
    parsed modules took 79 MB of heap (the MoE block alone 18 MB); resident memory after
    bench/compare.py's runs fell 1078 -> 988 MB without them. Here the parsed module is
    dropped once the kernel's symbols are registered, and parsed again from the bitcode
    when a compile links against the kernel.

    This reaches into numba's code library (``CPUCodeLibrary._unserialize`` and
    ``_get_module_for_linking``, as in numba 0.68); where either is missing nothing is
    changed. Returns whether the change is in place (tests/test_jit.py checks it is, and
    that a compile linking against a cached kernel still works).
    """
    lib_cls = getattr(_codegen, "CPUCodeLibrary", None)
    unserialize = getattr(lib_cls, "_unserialize", None)
    link_module = getattr(lib_cls, "_get_module_for_linking", None)
    if unserialize is None or link_module is None or not hasattr(unserialize, "__func__"):
        return False
    if getattr(lib_cls, "_numba_hybrid_lean", False):
        return True
    load = unserialize.__func__

    def _unserialize(cls, codegen, state):
        library = load(cls, codegen, state)
        kind, data = state[1], state[2]
        if kind == "object" and getattr(library, "_shared_module", None) is not None:
            library._shared_bitcode = data[1]
            library._shared_module = None
        return library

    def _get_module_for_linking(self):
        bitcode = getattr(self, "_shared_bitcode", None)
        if bitcode is not None and self._shared_module is None:
            self._shared_module = llvm.parse_bitcode(bitcode)
        return link_module(self)

    lib_cls._unserialize = classmethod(_unserialize)
    lib_cls._get_module_for_linking = _get_module_for_linking
    lib_cls._numba_hybrid_lean = True
    return True


LEAN_CACHED_KERNELS = lean_cached_kernels()
