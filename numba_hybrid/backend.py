"""Pick the compute backend once, at load time, and say so once."""

from __future__ import annotations

import logging

from .errors import DeviceUnavailableError

log = logging.getLogger("numba_hybrid")

DEVICES = ("reference", "cpu", "cuda")


def create_backend(device: str, model):
    if device == "reference":
        from .reference import ReferenceBackend

        backend = ReferenceBackend(model)
    elif device == "cpu":
        from .cpu.forward import CpuBackend

        backend = CpuBackend(model)
    elif device == "cuda":
        raise DeviceUnavailableError(f"device {device!r} is not available yet in this version")
    else:
        raise DeviceUnavailableError(
            f"unknown device {device!r} (choose one of: {', '.join(DEVICES)})")
    log.info("numba_hybrid: using the %s backend", backend.name)
    return backend
