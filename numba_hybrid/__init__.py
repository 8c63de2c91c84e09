"""numba_hybrid: an inference engine for hybrid recurrent LLMs (Qwen3-Next, Qwen3.5)."""

from .errors import (BatchError, DeviceUnavailableError, GGUFFormatError, ModelFormatError,
                     NumbaHybridError, UnsupportedModelError)
from .model import Model, load

__version__ = "0.1.0"

__all__ = [
    "BatchError", "DeviceUnavailableError", "GGUFFormatError", "Model", "ModelFormatError",
    "NumbaHybridError", "UnsupportedModelError", "load",
]
