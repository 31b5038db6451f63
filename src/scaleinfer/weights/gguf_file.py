"""The GGUF container: header, metadata and tensor table parsed from a memory map; tensor bytes as views.

Why not `gguf.GGUFReader`: it builds a numpy view per element of every metadata array, which costs
~2.6 s for SmolLM2's 49k-token vocabulary and ~8 s for Qwen2.5's 152k (measured). Here a vocabulary
is one Python loop over `struct.unpack_from`, ~20x faster. The `gguf` package still supplies the type
constants, block sizes and the dequantization kernels (see weights/gguf.py).

Format (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)
    tensor_count x  (name: string, n_dims u32, ne[n_dims] u64 (innermost first), ggml_type u32, offset u64)
    padding to general.alignment, then the tensor data (each tensor at data_start + offset)
A string is a u64 byte length and UTF-8 bytes; an array is element_type u32, count u64, elements.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from scaleinfer.errors import UnsupportedModelError, WeightLoadError

_SUPPORTED_VERSIONS = (2, 3)
_SCALARS = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_MAX_DIMS = 4
"""GGML_MAX_DIMS: llama.cpp refuses tensors with more dimensions."""
_MAX_ARRAY_NESTING = 8
"""Arrays of arrays deeper than this are refused (real files nest at most once)."""
_MAX_HEADER_BYTES = 64 << 20
_MAX_METADATA_ITEMS = 1 << 22
_MAX_TENSORS = 1 << 16
"""Bounds on what a header may make us allocate, whatever the file's size: metadata plus tensor table
within 64 MiB, 4M metadata values, 64k tensors (real files: under 10 MiB, ~1M values with a 262k
vocabulary, a few thousand tensors). A Python object per value costs ~8x its bytes in the file, so
without them a corrupt count could turn a 1 GB file into a 9 GB allocation."""


def _shown(text: str) -> str:
    """A name or key from the file as it appears in a message: quoted, and cut if long (it may be garbage)."""
    shown = repr(text)
    return shown if len(shown) <= 60 else shown[:57] + "..."


class _Corrupt(Exception):
    """Raised inside the parser; GGUFFile.open turns it into a one-line WeightLoadError."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """HF / torch order: outermost first (the file lists ne[0], the innermost, first)."""
    ggml_type: GGMLQuantizationType
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    num_bytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


@dataclass
class _Limit:
    """What the rest of the header may still use: bytes up to `end`, `items` metadata values."""
    end: int
    items: int


@dataclass
class GGUFFile:
    """A parsed GGUF: `metadata` (key -> Python value), `tensors` (in file order), data views on demand."""

    path: str
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    _buffer: mmap.mmap

    @classmethod
    def open(cls, path: str) -> "GGUFFile":
        """Parse the header of `path` (memory-mapped; no tensor data is read)."""
        if not os.path.isfile(path):
            raise WeightLoadError(f"model file not found: {path}; pass a catalog name (see `scaleinfer models`), "
                                  f"a .gguf file or an HF model directory")
        try:
            with open(path, "rb") as f:
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise WeightLoadError(f"cannot read {path} as a GGUF file ({exc}); check the file") from None
        try:
            version, metadata, tensors = _parse(buffer)
        except _Corrupt as exc:
            raise WeightLoadError(f"{path} is not a valid GGUF file: {exc}; re-download it or check that "
                                  f"the copy is complete") from None
        return cls(path, version, metadata, tensors, buffer)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes: a read-only uint8 view of the memory map, [rows, bytes_per_row]."""
        data = np.frombuffer(self._buffer, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        rows = prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        return data.reshape(rows, info.num_bytes // rows)


def _parse(buf) -> tuple[int, dict, list[TensorInfo]]:
    """Every count, length and offset read from the file is checked against the bytes left before it is
    used, so a corrupt file fails with _Corrupt (never a huge allocation, an overflow or a deep recursion)."""
    size = len(buf)
    if size < 24 or buf[:4] != b"GGUF":
        raise _Corrupt("it does not start with the GGUF magic bytes")
    (version,) = _U32.unpack_from(buf, 4)
    if version not in _SUPPORTED_VERSIONS:
        raise _Corrupt(f"GGUF version {version} is not one of {_SUPPORTED_VERSIONS} (or the file is big-endian)")
    tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    if tensor_count > _MAX_TENSORS:
        raise _Corrupt(f"it claims {tensor_count} tensors, more than the {_MAX_TENSORS} scaleinfer accepts")
    pos = 24
    metadata: dict = {}
    limit = _Limit(min(size, _MAX_HEADER_BYTES), _MAX_METADATA_ITEMS)
    try:
        for _ in range(_checked_count(kv_count, pos, limit, 12)):
            key, pos = _read_string(buf, pos, limit)
            if key in metadata:
                raise _Corrupt(f"metadata key {_shown(key)} appears twice")
            (value_type,) = _U32.unpack_from(buf, pos)
            metadata[key], pos = _read_value(buf, pos + 4, value_type, limit)
        entries, names = [], set()
        for _ in range(_checked_count(tensor_count, pos, limit, 24, counts_items=False)):
            name, pos = _read_string(buf, pos, limit)
            if name in names:
                raise _Corrupt(f"tensor {_shown(name)} appears twice in the tensor table")
            names.add(name)
            (num_dims,) = _U32.unpack_from(buf, pos)
            if not 1 <= num_dims <= _MAX_DIMS:
                raise _Corrupt(f"tensor {_shown(name)} claims {num_dims} dimensions at byte {pos} (1 to {_MAX_DIMS})")
            dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
            pos += 4 + 8 * num_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    except struct.error as exc:
        raise _Corrupt(f"its header ends early or is garbled ({exc} at byte {pos})") from None
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > size:
        raise _Corrupt(f"general.alignment is {alignment!r}, not a power of two within the file")
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = [_tensor_info(data_start, alignment, *e) for e in entries]
    for t in tensors:
        if t.offset + t.num_bytes > size:
            raise _Corrupt(f"tensor {_shown(t.name)} ({t.num_bytes} bytes at byte {t.offset}) runs past the end of the "
                           f"file ({size} bytes), so the file is truncated or its tensor table is corrupt")
    return version, metadata, tensors


def _tensor_info(data_start: int, alignment: int, name: str, shape: tuple[int, ...], type_id: int,
                 offset: int) -> TensorInfo:
    try:
        ggml_type = GGMLQuantizationType(type_id)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise UnsupportedModelError(f"tensor {_shown(name)} has unknown GGML type id {type_id}; this GGUF needs a "
                                    f"newer reader than scaleinfer has, or the file is corrupt") from None
    if min(shape) < 1 or shape[-1] % block_size or prod(shape) >= 1 << 62:
        raise _Corrupt(f"tensor {_shown(name)} has shape {shape}, not a whole number of {ggml_type.name} blocks "
                       f"per row with every dimension at least 1")
    if offset % alignment:
        raise _Corrupt(f"tensor {_shown(name)}'s data offset {offset} is not a multiple of the alignment {alignment}")
    return TensorInfo(name, shape, ggml_type, data_start + offset, prod(shape) // block_size * type_size)


def _checked_count(count: int, pos: int, limit: _Limit, min_item_bytes: int, counts_items: bool = True) -> int:
    """A count read from the file, refused when that many items cannot fit in the bytes left (or, for
    metadata values, exceed the budget of values left)."""
    if count * min_item_bytes > limit.end - pos:
        raise _Corrupt(f"it claims {count} entries at byte {pos}, more than the file can hold")
    if counts_items:
        if count > limit.items:
            raise _Corrupt(f"it claims {count} metadata values at byte {pos}, more than the "
                           f"{_MAX_METADATA_ITEMS} scaleinfer reads from one file")
        limit.items -= count
    return count


def _read_string(buf, pos: int, limit: _Limit) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, pos)
    if length > limit.end - pos - 8:
        raise _Corrupt(f"a string at byte {pos} claims {length} bytes, more than the file holds")
    end = pos + 8 + length
    return buf[pos + 8:end].decode("utf-8", errors="replace"), end


def _read_value(buf, pos: int, value_type: int, limit: _Limit, depth: int = 0):
    if value_type in _SCALARS:
        fmt, _ = _SCALARS[value_type]
        (value,) = struct.unpack_from(fmt, buf, pos)
        return value, pos + struct.calcsize(fmt)
    if value_type == GGUFValueType.STRING:
        return _read_string(buf, pos, limit)
    if value_type != GGUFValueType.ARRAY:
        raise _Corrupt(f"metadata value type {value_type} at byte {pos} is not a GGUF type")
    if depth >= _MAX_ARRAY_NESTING:
        raise _Corrupt(f"metadata arrays at byte {pos} are nested deeper than {_MAX_ARRAY_NESTING} levels")
    element_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if element_type in _SCALARS:  # token types, scores: one bulk read
        dtype = np.dtype(_SCALARS[element_type][1]).newbyteorder("<")
        count = _checked_count(count, pos, limit, dtype.itemsize)
        values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
        return values, pos + count * dtype.itemsize
    if element_type == GGUFValueType.STRING:  # vocabularies and merges: the hot loop
        values = []
        append, unpack = values.append, _U64.unpack_from
        end = limit.end
        for _ in range(_checked_count(count, pos, limit, 8)):
            (length,) = unpack(buf, pos)
            pos += 8
            if length > end - pos:
                raise _Corrupt(f"a string at byte {pos - 8} claims {length} bytes, more than the file holds")
            append(buf[pos:pos + length].decode("utf-8", errors="replace"))
            pos += length
        return values, pos
    if element_type == GGUFValueType.ARRAY:
        values = []
        for _ in range(_checked_count(count, pos, limit, 12)):
            value, pos = _read_value(buf, pos, element_type, limit, depth + 1)
            values.append(value)
        return values, pos
    raise _Corrupt(f"metadata array element type {element_type} at byte {pos} is not a GGUF type")
