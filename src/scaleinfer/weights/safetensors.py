"""HF model directories: config.json -> ModelConfig, single or sharded *.safetensors -> HF-named tensors.

Fed a local directory by weights/loader.py (a hub id is downloaded there first).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import WeightLoadError
from scaleinfer.models.registry import hf_family

_INDEX_FILE = "model.safetensors.index.json"
_BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def read_json(path: str) -> dict:
    """A model file's JSON (config.json, an index); WeightLoadError (one line) when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read {path} ({exc}); re-download or reinstall the model") from None


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of an HF directory, from its config.json, by the reader of its family
    (models/registry.py)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise WeightLoadError(f"{path} has no config.json; pass an HF model directory, a .gguf file or a catalog "
                              f"name (see `scaleinfer models`)")
    cfg = read_json(cfg_file)
    return hf_family(cfg.get("architectures") or [], cfg_file).read_hf_config(cfg, cfg_file)


def weight_files(path: str) -> list[str]:
    """The safetensors files of a directory: the shards its index names, or every *.safetensors."""
    index = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map") or {}
        files = [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise WeightLoadError(f"{path} lacks the weight shard {os.path.basename(missing[0])} named in "
                              f"{_INDEX_FILE}; the download is incomplete")
    if not files:
        files = _torch_bin_files(path)
    if not files:
        raise WeightLoadError(f"{path} has no *.safetensors weights (nor a pytorch_model.bin); only safetensors "
                              f"and PyTorch state-dict checkpoints are supported")
    return files


def _torch_bin_files(path: str) -> list[str]:
    """pytorch_model.bin (or the shards its index names): older hub repos (opus-mt) ship only these."""
    index = os.path.join(path, _BIN_INDEX_FILE)
    if os.path.isfile(index):
        shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
        return [os.path.join(path, shard) for shard in shards if os.path.isfile(os.path.join(path, shard))]
    single = os.path.join(path, "pytorch_model.bin")
    return [single] if os.path.isfile(single) else []


def _load_bin(file: str) -> dict:
    """A PyTorch state dict, read with the restricted unpickler (weights_only: tensors and plain data only,
    never arbitrary code), memory-mapped."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # UnpicklingError (not plain weights), a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightLoadError(f"cannot read {file} as a PyTorch state dict ({first}); the file is corrupt or not "
                              f"plain weights") from None
    if not isinstance(state, dict):
        raise WeightLoadError(f"{file} holds no state dict of tensors")
    return state


def _open(file: str):
    from safetensors import safe_open

    try:
        return safe_open(file, framework="pt")
    except Exception as exc:  # SafetensorError (header too large, invalid JSON ...), OSError
        raise WeightLoadError(f"cannot read {file} ({exc}); the file is corrupt or incomplete") from None


def count_tensors(files: list[str]) -> int:
    total = 0
    for file in files:
        if file.endswith(".bin"):
            total += sum(isinstance(t, torch.Tensor) for t in _load_bin(file).values())
            continue
        with _open(file) as f:
            total += len(f.keys())
    return total


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of every shard, as the files store them."""
    for file in files:
        if file.endswith(".bin"):
            yield from ((name, t.float()) for name, t in _load_bin(file).items() if isinstance(t, torch.Tensor))
            continue
        with _open(file) as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:  # data past the end of a truncated file
                    raise WeightLoadError(f"cannot read tensor {name} from {file} ({exc}); the file is corrupt "
                                          f"or incomplete") from None
                yield name, tensor.float()
