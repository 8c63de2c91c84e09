"""First-run compilation of the CPU kernels: know whether it is needed, and do it up front.

Numba compiles each kernel on its first call and caches the machine code on disk (in a
directory per version of the kernel sources, see jit.py), so only the first run on a
machine, or after the package changes, pays the compile time. A stamp file in that cache
records that a model of this precision ran once with these sources, numba and CPU; the
command line uses it to announce the one-time compilation instead of sitting silent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import llvmlite.binding as llvm
import numba


def _stamp(precision: str) -> Path:
    from . import matmul
    from .jit import SOURCES_DIGEST

    key = repr((SOURCES_DIGEST, numba.__version__, llvm.get_host_cpu_name(),
                llvm.get_host_cpu_features().flatten(), precision))
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(matmul.matmul._cache._cache_path) / f"numba_hybrid-{digest}.compiled"


def is_compiled(precision: str) -> bool:
    """Whether the kernels for ``precision`` were compiled and cached on this machine."""
    return _stamp(precision).exists()


def warm_up(model) -> None:
    """Run the kernels once on a freshly loaded model (a prefill and a decode step on
    slot 0, which is then emptied again) so that they are compiled, or loaded from the
    cache, now; then record it."""
    model.decode([0, 0], [0, 1], [0, 0])
    model.decode([0], [2], [0])
    model.reset(0)
    try:
        path = _stamp(model.precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:        # a read-only install: the notice shows again, nothing breaks
        pass
