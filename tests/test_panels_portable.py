"""The panel kernels' portable path (CPUs without AVX512-VNNI) gives the same bits.

The integer sums are exact either way, so the outputs must be identical. The portable
build runs in a subprocess with a cache directory of its own (the kernel cache is keyed by
source and CPU, not by this switch)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
from gguf import GGMLQuantizationType as QT

from numba_hybrid import quants
from numba_hybrid.cpu.forward import linear_int, qweight, quantize

from test_cpu_kernels import _Tensor, assert_close, random_weight

TYPES = (QT.Q8_0, QT.Q4_K, QT.Q6_K)
SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from numba_hybrid import quants
    from numba_hybrid.cpu.forward import linear_int, qweight, quantize
    sys.path.insert(0, sys.argv[2])
    from test_cpu_kernels import _Tensor
    data = np.load(sys.argv[1])
    out = {}
    for name in ("Q8_0", "Q4_K", "Q6_K"):
        raw, x = data["raw_" + name], data["x_" + name]
        qt = QT[name]
        w = qweight(_Tensor(raw, qt, (x.shape[1], raw.shape[0])), fast=True)
        y = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
        linear_int(quantize(x, quants.activation_kind(qt)), w, y)
        out[name] = y
    np.savez(sys.argv[1] + ".out.npz", **out)
""")


def test_portable_path_gives_the_same_bits(tmp_path):
    rng = np.random.default_rng(5)
    n, k, T = 40, 512, 7
    data = {}
    for qt in TYPES:
        data["raw_" + qt.name] = random_weight(qt, n, k, rng)
        data["x_" + qt.name] = rng.standard_normal((T, k)).astype(np.float32)
    path = tmp_path / "case.npz"
    np.savez(path, **data)
    env = dict(os.environ, NUMBA_HYBRID_NO_VNNI="1", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", SCRIPT, str(path), os.path.dirname(__file__)],
                   env=env, check=True)
    portable = np.load(str(path) + ".out.npz")
    for qt in TYPES:
        raw, x = data["raw_" + qt.name], data["x_" + qt.name]
        act = quants.activation_kind(qt)
        here = np.full((T, n), np.nan, np.float32)
        linear_int(quantize(x, act), qweight(_Tensor(raw, qt, (k, n)), fast=True), here)
        np.testing.assert_array_equal(portable[qt.name], here, err_msg=qt.name)
        ref = (quants.round_activations(x, act).astype(np.float64)
               @ quants.dequantize(raw, qt).astype(np.float64).T)
        assert_close("matmul", ref, here)
