"""Pure NumPy float64 reference: the specification and oracle for every kernel."""

from .forward import ReferenceBackend

__all__ = ["ReferenceBackend"]
