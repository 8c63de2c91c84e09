"""GGML weight types: block geometry, which types this engine supports, and NumPy
dequantisation (the exact values every backend must reproduce)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from .errors import UnsupportedModelError

# Types this engine loads and computes with.
SUPPORTED_TYPES = (
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS,
)


def block_geometry(qtype: QT) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def check_supported(qtype: QT, tensor_name: str) -> None:
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"unsupported tensor type {qtype.name} in tensor {tensor_name!r} "
            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
        )


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Raw tensor data (as ``TensorInfo.data``) -> float32 array of the logical shape.

    Placeholder until the own implementation lands.
    """
    from gguf.quants import dequantize as _gguf_dequantize

    return np.asarray(_gguf_dequantize(data, qtype), dtype=np.float32)
