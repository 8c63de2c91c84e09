"""jit.lean_cached_kernels: a kernel loaded from the cache drops its parsed IR, and a
compile that links against it afterwards still works (the IR is parsed again from its
bitcode). Both processes run in a fresh cache directory, in subprocesses, so that the
second one really loads from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Compiles (first run) or loads (second run) ``inner`` from the cache, then compiles
# ``outer``, which calls it and so links its IR in.
SCRIPT = textwrap.dedent("""
    import numpy as np
    from numba_hybrid.cpu import jit
    import kernels

    assert jit.LEAN_CACHED_KERNELS
    x = np.arange(5, dtype=np.float64)
    assert kernels.inner(x) == 30.0
    library = kernels.inner.overloads[kernels.inner.signatures[0]].library
    loaded = bool(kernels.inner.stats.cache_hits)
    print("LOADED", loaded, "PARSED", library._shared_module is not None)
    assert kernels.outer(x) == 61.0
    print("AFTER_LINK_PARSED", library._shared_module is not None)
""")

KERNELS = textwrap.dedent("""
    import numba

    @numba.njit(cache=True)
    def inner(x):
        s = 0.0
        for v in x:
            s += v * v
        return s

    @numba.njit
    def outer(x):
        return 2.0 * inner(x) + 1.0
""")


def _run(tmp_path) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cached_kernel_drops_ir_and_links_afterwards(tmp_path):
    (tmp_path / "kernels.py").write_text(KERNELS)
    first = _run(tmp_path)
    # Compiled here: numba keeps the module it made (not from the cache).
    assert "LOADED False" in first
    second = _run(tmp_path)
    assert "LOADED True PARSED False" in second
    # outer's compile linked inner in: its IR was parsed again from the bitcode.
    assert "AFTER_LINK_PARSED True" in second
