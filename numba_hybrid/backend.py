"""Pick the compute backend once, at load time, and say so once."""

from __future__ import annotations

import logging

from .errors import DeviceUnavailableError

log = logging.getLogger("numba_hybrid")

DEVICES = ("reference", "cpu", "cuda")


PRECISIONS = ("exact", "fast")
# fast: as accurate against llama.cpp's own quantised runs, and its integer kernels are
# faster (README, "Backends and precision").
DEFAULT_PRECISION = "fast"


def create_backend(device: str, model, precision: str = DEFAULT_PRECISION):
    """``precision``: "exact" keeps activations in float32 (weights dequantised exactly);
    "fast" rounds activations before each product with a quantised weight as ggml does."""
    if precision not in PRECISIONS:
        raise DeviceUnavailableError(
            f"unknown precision {precision!r} (choose one of: {', '.join(PRECISIONS)})")
    if device == "reference":
        from .reference import ReferenceBackend

        backend = ReferenceBackend(model, precision)
    elif device == "cpu":
        from .cpu.forward import CpuBackend

        backend = CpuBackend(model, precision)
    elif device == "cuda":
        raise DeviceUnavailableError(f"device {device!r} is not available yet in this version")
    else:
        raise DeviceUnavailableError(
            f"unknown device {device!r} (choose one of: {', '.join(DEVICES)})")
    log.info("numba_hybrid: using the %s backend, %s precision", backend.name, precision)
    return backend
