"""CTranslate2 model directories (model.bin + config.json + tokenizer.json): the binary format, read lazily.

model.bin, as ctranslate2/specs/model_spec.py (`_serialize`) writes it, all little-endian:

    uint32 binary_version (<= 6)   string spec_name ("WhisperSpec")   uint32 spec_revision
    uint32 num_variables, then per variable:
        string name ("encoder/layer_0/self_attention/linear_0/weight")
        uint8 ndim, uint32 dims[ndim], uint8 dtype id, uint32 num_bytes, bytes data
    uint32 num_aliases, then per alias: string alias, string variable name
    string = uint16 length (the trailing NUL included), the UTF-8 bytes, NUL

dtype ids (include/ctranslate2/types.h): 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.
A quantized linear stores `weight` as int8 [out, in] with `weight_scale` float [out] (w = q / scale, per
output row), or int16 with one scalar scale; scalars (num_heads, flags) are 0-dimensional variables.
Tensors are read through one memory map and converted to float32 one at a time (no second copy of the model).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from scaleinfer.errors import WeightLoadError
from scaleinfer.weights.safetensors import read_json

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
MAX_BINARY_VERSION = 6


@dataclass(frozen=True)
class Variable:
    shape: tuple[int, ...]
    dtype_id: int
    offset: int
    nbytes: int


class CT2ModelFile:
    """The variables of one model.bin, by name (aliases resolved), over a read-only memory map."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise WeightLoadError(f"cannot read {path} ({exc}); reinstall the model") from None
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise WeightLoadError(f"{path} is not a complete CTranslate2 model.bin ({exc}); is a part missing?") from None

    def _read(self, fmt: str):
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._map):
            raise struct.error(f"ends at byte {len(self._map)}, inside the header")
        value = struct.unpack_from("<" + fmt, self._map, self._pos)[0]
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._read("H")
        text = bytes(self._map[self._pos:self._pos + n - 1]).decode("utf-8")
        self._pos += n
        return text

    def _parse(self) -> None:
        self.binary_version = self._read("I")
        if not 1 <= self.binary_version <= MAX_BINARY_VERSION:
            raise WeightLoadError(f"{self.path}: CTranslate2 binary version {self.binary_version} is not one we read "
                                  f"(1-{MAX_BINARY_VERSION}); is it a model.bin?")
        self.spec_name = self._string()
        self.revision = self._read("I")
        self.variables: dict[str, Variable] = {}
        for _ in range(self._read("I")):
            name = self._string()
            shape = tuple(self._read("I") for _ in range(self._read("B")))
            dtype_id, nbytes = self._read("B"), self._read("I")
            if dtype_id not in _DTYPES:
                raise WeightLoadError(f"{self.path}: variable {name} has unknown dtype id {dtype_id}")
            if self._pos + nbytes > len(self._map):
                raise WeightLoadError(f"{self.path} ends inside variable {name} (byte {len(self._map)} of "
                                      f"{self._pos + nbytes}); the file is truncated: is a part missing?")
            self.variables[name] = Variable(shape, dtype_id, self._pos, nbytes)
            self._pos += nbytes
        for _ in range(self._read("I")):
            alias, target = self._string(), self._string()
            self.variables[alias] = self.variables[target]

    # ---- values ----------------------------------------------------------------------------------
    def raw(self, name: str) -> torch.Tensor:
        """The variable as stored (its own dtype), a copy out of the map."""
        var = self._var(name)
        dtype = _DTYPES[var.dtype_id]
        if dtype == "bfloat16":
            words = np.frombuffer(self._map, np.int16, var.nbytes // 2, var.offset).copy()
            return torch.from_numpy(words).view(torch.bfloat16).reshape(var.shape)
        count = var.nbytes // np.dtype(dtype).itemsize
        return torch.from_numpy(np.frombuffer(self._map, dtype, count, var.offset).copy()).reshape(var.shape)

    def scalar(self, name: str) -> int:
        return int(self.raw(name).item())

    def tensor(self, name: str) -> torch.Tensor:
        """The variable as float32, a quantized weight dequantized with its `<name>_scale`."""
        value = self.raw(name)
        if value.dtype in (torch.int8, torch.int16):
            scale_name = f"{name}_scale"
            if scale_name not in self.variables:
                raise WeightLoadError(f"{self.path}: {name} is {value.dtype} but has no {scale_name}")
            scale = self.raw(scale_name).float()
            if scale.dim() == 1:   # one scale per output row
                scale = scale.view(-1, *([1] * (value.dim() - 1)))
            return value.float() / scale
        return value.float()

    def stored_type(self, name: str) -> str:
        """"float32", "int8", "int16", "int32", "float16" or "bfloat16"."""
        return {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}[self._var(name).dtype_id]

    def has(self, name: str) -> bool:
        return name in self.variables

    def _var(self, name: str) -> Variable:
        if name not in self.variables:
            raise WeightLoadError(f"{self.path} lacks the variable {name!r}; is it a model of another kind?")
        return self.variables[name]

    def count_layers(self, prefix: str) -> int:
        """How many `<prefix>/layer_N/` blocks the file holds."""
        n = 0
        while any(k.startswith(f"{prefix}/layer_{n}/") for k in self.variables):
            n += 1
        return n


def is_ctranslate2_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.bin"))


def open_ctranslate2_dir(path: str):
    """A Checkpoint of a CTranslate2 model directory (so far: WhisperSpec models)."""
    from scaleinfer.tokenizer import Tokenizer
    from scaleinfer.weights.checkpoint import Checkpoint
    from scaleinfer.weights.ct2_whisper import read_whisper_config, whisper_tensors, with_special_tokens

    ct2 = CT2ModelFile(os.path.join(path, "model.bin"))
    if ct2.spec_name != "WhisperSpec":
        raise WeightLoadError(f"{path}: CTranslate2 {ct2.spec_name} models are not supported; supported: WhisperSpec")
    cfg_file = os.path.join(path, "config.json")
    config = read_whisper_config(ct2, read_json(cfg_file) if os.path.isfile(cfg_file) else {}, path)
    tokenizer = Tokenizer.from_hf_dir(path)
    config = with_special_tokens(config, tokenizer.backend.token_to_id, path)
    tokenizer = Tokenizer.from_hf_dir(path, extra_eos_token_ids=config.eos_token_ids)
    num_tensors = sum(1 for _ in whisper_tensors(ct2, config, names_only=True))
    return Checkpoint(config, tokenizer, path, "ctranslate2", num_tensors, lambda: whisper_tensors(ct2, config))
