"""The exceptions numba_hybrid raises on bad input.

Every problem with a user's file or request surfaces as one of these, with a message that
names the file, key, tensor or batch entry at fault. The CLI prints ``str(error)`` on one
line and exits with code 2.
"""


class NumbaHybridError(Exception):
    """Base class of every error numba_hybrid raises on purpose."""


class GGUFFormatError(NumbaHybridError):
    """The file is missing, is not a GGUF file, or its structure is damaged (truncated,
    wrong magic or version, tensor data outside the file)."""


class UnsupportedModelError(NumbaHybridError):
    """A well-formed GGUF that this engine cannot run: unknown architecture or an
    unsupported tensor type."""


class ModelFormatError(NumbaHybridError):
    """A GGUF of a supported architecture whose metadata or tensors are inconsistent:
    a missing required key, a value of the wrong type, a tensor with the wrong shape."""


class BatchError(NumbaHybridError, ValueError):
    """An invalid batch passed to ``Model.decode``; nothing was changed."""


class DeviceUnavailableError(NumbaHybridError):
    """The requested device (backend) cannot be used here."""
