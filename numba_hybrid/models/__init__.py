"""Model registry: ``general.architecture`` -> the class that reads that architecture."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..gguf_file import GGUFFile
from .qwen3next import ATTENTION, RECURRENT, ModelArgs, Qwen3Next
from .qwen35 import Qwen35

ARCHITECTURES = {
    "qwen3next": Qwen3Next,
    "qwen35": Qwen35,
    "qwen35moe": Qwen35,
}


def read_model(f: GGUFFile) -> Qwen3Next:
    arch = f.architecture
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise UnsupportedModelError(
            f"{f.path}: unsupported architecture {arch!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return cls(f)


__all__ = ["ARCHITECTURES", "ATTENTION", "RECURRENT", "ModelArgs", "read_model"]
