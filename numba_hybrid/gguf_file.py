"""Open a GGUF file, memory-mapped, with typed metadata access and clear errors.

Parsing is done by ``gguf.GGUFReader``; this module turns whatever a damaged file makes it
raise into one :class:`GGUFFormatError` naming the file, checks that every tensor's data
lies inside the file, and exposes tensors as zero-copy views of the mapping.

``GGUFReader`` trusts every count in the file: an array length of 2**60 makes it loop
(and append to lists) long after the end of the file, because reads past the end return
empty arrays instead of failing. :func:`_prescan` therefore walks the header, metadata and
tensor infos once with ``struct`` (cheap: no NumPy objects per element) and checks every
count and length against the bytes that remain, before ``GGUFReader`` is called.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import GGUFFormatError, ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

_INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}

# What gguf.GGUFReader (NumPy views of a memmap, enum lookups, UTF-8 decoding) raises on a
# damaged file. UnicodeDecodeError is a ValueError, OverflowError an ArithmeticError.
_PARSER_ERRORS = (ValueError, IndexError, KeyError, TypeError, ArithmeticError, MemoryError,
                  AttributeError, RecursionError, EOFError, OSError, struct.error)


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


class _Reader(GGUFReader):
    """GGUFReader whose metadata reads use a plain-ndarray view of its memory map.

    Parsing does a few tiny reads per vocabulary entry; on an ``np.memmap`` each one goes
    through memmap's Python-level ``__getitem__``/``__array_finalize__``, two thirds of
    the parse time. Tensor data, read once ``data_offset`` is known, still come from the
    memmap itself, exactly as in GGUFReader."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if "data_offset" in self.__dict__:
            return super()._get(offset, dtype, count, override_order)
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


class GGUFFile:
    """A parsed GGUF file. Weights stay in the memory map; nothing is copied."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        _check_header(self.path)
        _prescan(self.path)
        try:
            reader = _Reader(self.path, "r")
        except GGUFFormatError:
            raise
        except _PARSER_ERRORS as exc:
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
            except _PARSER_ERRORS as exc:
                raise GGUFFormatError(
                    f"{self.path}: damaged metadata value {name!r} ({exc})") from None
            self._field_types[name] = list(field.types)
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            info = self._tensor_info(t)
            if info.name in self.tensors:
                raise GGUFFormatError(f"{self.path}: tensor {info.name!r} appears twice")
            self.tensors[info.name] = info

    def release_pages(self) -> None:
        """Drop the mapped file pages from this process's resident memory (after the
        weights were repacked, say). Nothing changes for the program: the pages are clean
        and come back from the page cache or the disk if a tensor is read again."""
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

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


# ---- structural pre-validation ------------------------------------------------------------

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1, GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_MIN_KV_BYTES = 8 + 4 + 1          # empty key, type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_MAX_DIMS = 4                      # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 4               # arrays of arrays: GGUFReader recurses per level
_DEFAULT_ALIGNMENT = 32


class _Cursor:
    """Little-endian reads from a buffer that fail with a GGUFFormatError past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def fail(self, msg: str):
        raise GGUFFormatError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            self.fail(f"truncated file: {what} at byte {self.pos} needs {n} bytes, "
                      f"only {self.end - self.pos} remain")

    def u32(self, what: str) -> int:
        self.need(4, what)
        self.pos += 4
        return struct.unpack_from("<I", self.buf, self.pos - 4)[0]

    def u64(self, what: str) -> int:
        self.need(8, what)
        self.pos += 8
        return struct.unpack_from("<Q", self.buf, self.pos - 8)[0]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8")

    def count(self, what: str, min_item_bytes: int) -> int:
        """A count whose items take at least ``min_item_bytes`` each: it must fit."""
        n = self.u64(what)
        if n * min_item_bytes > self.end - self.pos:
            self.fail(f"{what} is {n}, more than the remaining {self.end - self.pos} bytes "
                      f"of the file can hold")
        return n


def _prescan(path: str) -> None:
    """Walk header, metadata and tensor infos, checking every count, length and type
    against the file before GGUFReader trusts them; raise GGUFFormatError on the first
    problem. Tensor data are not read, only their extents checked."""
    try:
        with open(path, "rb") as fh:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _scan(_Cursor(buf, path))
    except (OSError, ValueError) as exc:  # mmap of a special file, a file changing under us
        if isinstance(exc, GGUFFormatError):
            raise
        raise GGUFFormatError(f"{path}: cannot read ({exc})") from None


def _scan(c: _Cursor) -> None:
    c.skip(8, "magic and version")  # checked by _check_header
    n_tensors = c.count("tensor count", _MIN_TENSOR_INFO_BYTES)
    n_kv = c.count("metadata key/value count", _MIN_KV_BYTES)
    alignment = _DEFAULT_ALIGNMENT
    seen: set[str] = set()
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if key in seen:
            c.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = c.u32(f"type of metadata key {key!r}")
        if key == "general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = c.u32(f"value of {key!r}")
            if alignment == 0 or alignment & (alignment - 1):
                c.fail(f"general.alignment {alignment} is not a power of two")
        else:
            _skip_value(c, vtype, key, 0)
    names: set[str] = set()
    extents = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}")
        if name in names:
            c.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            c.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        ne = [c.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        n_elements = 1
        for n in ne:
            n_elements *= n
        if any(n >= 2**63 for n in ne) or n_elements >= 2**63:
            c.fail(f"tensor {name!r} has an impossible shape (ne) {ne}")
        raw_type = c.u32(f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            c.fail(f"tensor {name!r} has unknown type id {raw_type}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne and ne[0] % block:
            c.fail(f"tensor {name!r} of type {qtype.name}: row length {ne[0]} is not a "
                   f"multiple of the block size {block}")
        offset = c.u64(f"data offset of tensor {name!r}")
        if offset % alignment:
            c.fail(f"data offset {offset} of tensor {name!r} is not a multiple of the "
                   f"alignment {alignment}")
        extents.append((name, offset, n_elements // block * type_size))
    data_start = -(-c.pos // alignment) * alignment
    for name, offset, n_bytes in extents:
        if data_start + offset + n_bytes > c.end:
            c.fail(f"data of tensor {name!r} runs past the end of the file (needs bytes up "
                   f"to {data_start + offset + n_bytes}, file has {c.end})")


def _skip_value(c: _Cursor, vtype: int, key: str, depth: int) -> None:
    """Step over one metadata value of type ``vtype``."""
    size = _SCALAR_SIZES.get(vtype)
    if size is not None:
        c.skip(size, f"value of {key!r}")
    elif vtype == GGUFValueType.STRING:
        c.skip(c.u64(f"string length of {key!r}"), f"string value of {key!r}")
    elif vtype == GGUFValueType.ARRAY:
        itype = c.u32(f"element type of array {key!r}")
        size = _SCALAR_SIZES.get(itype)
        if size is not None:
            c.skip(c.count(f"length of array {key!r}", size) * size, f"array {key!r}")
        elif itype == GGUFValueType.STRING:
            for _ in range(c.count(f"length of array {key!r}", 8)):
                c.skip(c.u64(f"string length in array {key!r}"), f"string in array {key!r}")
        elif itype == GGUFValueType.ARRAY:
            if depth + 1 >= _MAX_ARRAY_DEPTH:
                c.fail(f"metadata array {key!r} nests arrays more than "
                       f"{_MAX_ARRAY_DEPTH} deep")
            for _ in range(c.count(f"length of array {key!r}", 12)):
                _skip_value(c, itype, key, depth + 1)
        else:
            c.fail(f"array {key!r} has unknown element type {itype}")
    else:
        c.fail(f"metadata key {key!r} has unknown value type {vtype}")
