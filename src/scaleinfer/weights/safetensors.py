"""HF model directories: config.json -> ModelConfig, single or sharded *.safetensors -> tensors."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def read_model_config(path: str) -> ModelConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise WeightLoadError(f"{path} has no config.json; is it an HF model directory?")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    arch_names = cfg.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in arch_names if a in _ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(f"architecture {arch_names} is not supported; supported: "
                                    f"{', '.join(sorted(_ARCHITECTURES))}")
    num_heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type") not in (None, "default"):
        scaling = rope
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    use_window = cfg.get("use_sliding_window", arch != "qwen2")
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
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
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise WeightLoadError(f"{path} lacks safetensors weights{': ' + missing[0] if missing else ''}")
    return files


def count_tensors(files: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(list(f.keys()))
    return total


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).float()
        except (OSError, RuntimeError) as exc:
            raise WeightLoadError(f"cannot read {file}: {exc}") from None
