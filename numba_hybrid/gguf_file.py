"""Open a GGUF file, memory-mapped, with typed metadata access and clear errors.

Parsing is done by ``gguf.GGUFReader``; this module turns whatever a damaged file makes it
raise into one :class:`GGUFFormatError` naming the file, checks that every tensor's data
lies inside the file, and exposes tensors as zero-copy views of the mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import GGUFFormatError, ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

_INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file.

    ``ne`` is ggml's dimension order (ne[0] contiguous); ``shape`` is the numpy order
    (reversed ``ne``). ``data`` is a read-only view into the memory map: typed for F32/F16,
    raw bytes ``uint8[..., bytes_per_row]`` for every other type.
    """

    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]
    n_bytes: int
    offset: int
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne, dtype=np.int64))


class GGUFFile:
    """A parsed GGUF file. Weights stay in the memory map; nothing is copied."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        _check_header(self.path)
        try:
            reader = GGUFReader(self.path, "r")
        except GGUFFormatError:
            raise
        except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError,
                UnicodeDecodeError, AttributeError) as exc:
            raise GGUFFormatError(f"{self.path}: damaged GGUF file ({exc})") from None
        self._reader = reader
        self.file_size = os.path.getsize(self.path)
        self.metadata: dict[str, Any] = {}
        self._field_types: dict[str, list[GGUFValueType]] = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                self.metadata[name] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError, TypeError) as exc:
                raise GGUFFormatError(f"{self.path}: damaged metadata value {name!r} ({exc})")
            self._field_types[name] = list(field.types)
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            info = self._tensor_info(t)
            if info.name in self.tensors:
                raise GGUFFormatError(f"{self.path}: tensor {info.name!r} appears twice")
            self.tensors[info.name] = info

    def _tensor_info(self, t) -> TensorInfo:
        name = str(t.name)
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.data_offset) < 0 or end > self.file_size:
            raise GGUFFormatError(
                f"{self.path}: data of tensor {name!r} runs past the end of the file "
                f"(needs bytes up to {end}, file has {self.file_size})"
            )
        ne = tuple(int(n) for n in t.shape)
        data = t.data
        if data.nbytes != int(t.n_bytes):
            raise GGUFFormatError(f"{self.path}: tensor {name!r} is truncated")
        return TensorInfo(name, GGMLQuantizationType(int(t.tensor_type)), ne,
                          int(t.n_bytes), int(t.data_offset), data)

    # ---- metadata -------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self.metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFormatError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]

    def _scalar_type(self, key: str) -> GGUFValueType:
        types = self._field_types[key]
        return types[0]

    def get_int(self, key: str, default: int | None = None) -> int:
        """An integer key; ``default`` if absent, or an error if absent and no default."""
        if key not in self.metadata:
            if default is None:
                self._require(key)
            return default
        if self._scalar_type(key) not in _INT_TYPES:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} must be an integer")
        return int(self.metadata[key])

    def get_float(self, key: str, default: float | None = None) -> float:
        if key not in self.metadata:
            if default is None:
                self._require(key)
            return default
        if self._scalar_type(key) not in _FLOAT_TYPES | _INT_TYPES:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} must be a number")
        return float(self.metadata[key])

    def get_str(self, key: str, default: str | None = None) -> str:
        if key not in self.metadata:
            if default is None:
                self._require(key)
            return default
        if self._scalar_type(key) != GGUFValueType.STRING:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} must be a string")
        return str(self.metadata[key])

    def get_bool(self, key: str, default: bool | None = None) -> bool:
        if key not in self.metadata:
            if default is None:
                self._require(key)
            return default
        if self._scalar_type(key) != GGUFValueType.BOOL:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} must be a bool")
        return bool(self.metadata[key])

    def get_array(self, key: str, default: list | None = None) -> list:
        if key not in self.metadata:
            if default is None:
                self._require(key)
            return default
        if self._scalar_type(key) != GGUFValueType.ARRAY:
            raise ModelFormatError(f"{self.path}: metadata key {key!r} must be an array")
        return list(self.metadata[key])

    @property
    def architecture(self) -> str:
        return self.get_str("general.architecture")


def _check_header(path: str) -> None:
    """Reject what is plainly not a GGUF file before handing it to the parser."""
    if not os.path.exists(path):
        raise GGUFFormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise GGUFFormatError(f"{path}: is a directory, not a GGUF file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise GGUFFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if len(head) < 8:
        raise GGUFFormatError(f"{path}: too short to be a GGUF file ({len(head)} bytes)")
    if head[:4] != GGUF_MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(
            f"{path}: unsupported GGUF version {version} (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
