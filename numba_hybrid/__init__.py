"""numba_hybrid: an inference engine for hybrid recurrent LLMs (Qwen3-Next, Qwen3.5)."""

import os as _os

# libgomp's default spin-wait makes every Numba parallel region stall for a scheduler slice
# whenever another process wants the CPU; a short spin keeps idle speed and removes that.
# It must be set before Numba's OpenMP runtime loads, hence here.
_os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from .errors import (BatchError, DeviceUnavailableError, GGUFFormatError, ModelFormatError,
                     NumbaHybridError, UnsupportedModelError)
from .engine.sampler import SamplingParams
from .model import Model, load

__version__ = "0.1.0"

__all__ = [
    "BatchError", "DeviceUnavailableError", "GGUFFormatError", "Model", "ModelFormatError",
    "NumbaHybridError", "SamplingParams", "UnsupportedModelError", "load",
]
