"""The bundled default model: a small qwen35 model trained on Shakespeare, shipped as
package data so ``numba-hybrid run`` and ``nh.load()`` work with no download."""

from __future__ import annotations

from pathlib import Path

from .errors import NumbaHybridError

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_MODEL_NAME = "shakespeare-qwen35-q8_0.gguf"


def default_model_path() -> Path:
    """Path of the bundled model; a clear error if this installation lacks it."""
    path = DATA_DIR / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise NumbaHybridError(
            f"the bundled default model {DEFAULT_MODEL_NAME} is not installed with this copy of "
            "numba_hybrid; pass a GGUF file with -m / nh.load(path)")
    return path
