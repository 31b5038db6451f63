"""HF model directories: config.json -> ModelConfig, single or sharded *.safetensors -> HF-named tensors.

Fed a local directory by weights/loader.py (a hub id is downloaded there first).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
"""HF `architectures` entries we load -> our family name (models.ARCHITECTURES)."""
_INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read {path} ({exc}); re-download the model") from None


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a Llama / Mistral / Qwen2 HF directory, from its config.json."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise WeightLoadError(f"{path} has no config.json; pass an HF model directory, a .gguf file or a catalog "
                              f"name (see `scaleinfer models`)")
    cfg = _read_json(cfg_file)
    arch_names = cfg.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in arch_names if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(f"architecture {arch_names} in {cfg_file} is not supported; supported: "
                                    f"{', '.join(sorted(ARCHITECTURES))}")

    def required(key: str):
        if cfg.get(key) is None:
            raise WeightLoadError(f"{cfg_file} lacks {key!r}; the config is incomplete")
        return cfg[key]

    num_heads = required("num_attention_heads")
    hidden_size = required("hidden_size")
    # transformers >= 5 nests RoPE settings under rope_parameters; older configs keep them top-level.
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type") not in (None, "default"):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    # Qwen2 configs carry a sliding_window that is off unless use_sliding_window; Mistral's is on.
    use_window = bool(cfg.get("use_sliding_window", False)) if arch == "qwen2" else True
    return ModelConfig(
        architecture=arch,
        vocab_size=required("vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden_size // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_window=cfg.get("sliding_window") if use_window else None,
        name=os.path.basename(os.path.normpath(path)),
    )


def weight_files(path: str) -> list[str]:
    """The safetensors files of a directory: the shards its index names, or every *.safetensors."""
    index = os.path.join(path, _INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map") or {}
        files = [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise WeightLoadError(f"{path} lacks the weight shard {os.path.basename(missing[0])} named in "
                              f"{_INDEX_FILE}; the download is incomplete")
    if not files:
        raise WeightLoadError(f"{path} has no *.safetensors weights; only safetensors checkpoints are supported")
    return files


def _open(file: str):
    from safetensors import safe_open

    try:
        return safe_open(file, framework="pt")
    except Exception as exc:  # SafetensorError (header too large, invalid JSON ...), OSError
        raise WeightLoadError(f"cannot read {file} ({exc}); the file is corrupt or incomplete") from None


def count_tensors(files: list[str]) -> int:
    total = 0
    for file in files:
        with _open(file) as f:
            total += len(f.keys())
    return total


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of every shard, as the files store them."""
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:  # data past the end of a truncated file
                    raise WeightLoadError(f"cannot read tensor {name} from {file} ({exc}); the file is corrupt "
                                          f"or incomplete") from None
                yield name, tensor.float()
