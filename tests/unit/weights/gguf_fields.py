"""Where each structural field of an intact GGUF lies: the map the fuzz test mutates (written independently
of scaleinfer's reader, so a reader bug cannot hide in both)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Field:
    kind: str
    """magic, version, count, key_len, value_type, elem_type, array_count, str_len, scalar,
    tensor_name_len, n_dims, dim, ggml_type, offset, string (the bytes of a string), data"""
    pos: int
    width: int
    owner: str = ""
    """The metadata key or tensor name the field belongs to."""


def walk(buf: bytes, strings_per_array: int = 3) -> list[Field]:
    """Every header field of `buf` in file order (only the first few elements of long string arrays)."""
    fields = [Field("magic", 0, 4), Field("version", 4, 4), Field("count", 8, 8, "tensor_count"),
              Field("count", 16, 8, "kv_count")]
    tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(kind: str, owner: str = "") -> str:
        nonlocal pos
        (length,) = struct.unpack_from("<Q", buf, pos)
        text = buf[pos + 8:pos + 8 + length].decode("utf-8", "replace")
        owner = owner or text  # a key or tensor name owns its own length and bytes
        fields.append(Field(kind, pos, 8, owner))
        if length:
            fields.append(Field("string", pos + 8, length, owner))
        pos += 8 + length
        return text

    def value(value_type: int, key: str, record: bool = True) -> None:
        nonlocal pos
        if value_type in _SCALAR_SIZES:
            if record:
                fields.append(Field("scalar", pos, _SCALAR_SIZES[value_type], key))
            pos += _SCALAR_SIZES[value_type]
        elif value_type == _STRING:
            if record:
                string("str_len", key)
            else:
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            element_type, count = struct.unpack_from("<IQ", buf, pos)
            fields.extend([Field("elem_type", pos, 4, key), Field("array_count", pos + 4, 8, key)])
            pos += 12
            for i in range(count):
                value(element_type, key, record and i < strings_per_array)

    for _ in range(kv_count):
        key = string("key_len")
        (value_type,) = struct.unpack_from("<I", buf, pos)
        fields.append(Field("value_type", pos, 4, key))
        pos += 4
        value(value_type, key)
    for _ in range(tensor_count):
        name = string("tensor_name_len")
        (num_dims,) = struct.unpack_from("<I", buf, pos)
        fields.append(Field("n_dims", pos, 4, name))
        fields.extend(Field("dim", pos + 4 + 8 * i, 8, name) for i in range(num_dims))
        pos += 4 + 8 * num_dims
        fields.extend([Field("ggml_type", pos, 4, name), Field("offset", pos + 4, 8, name)])
        pos += 12
    fields.append(Field("data", pos, len(buf) - pos))
    return fields
