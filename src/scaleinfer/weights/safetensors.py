"""HF model directories: config.json -> ModelConfig, single or sharded *.safetensors -> HF-named tensors.

Fed a local directory by weights/loader.py (a hub id is downloaded there first).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3"}
"""HF `architectures` entries we load -> our family name (models.ARCHITECTURES)."""
_INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read {path} ({exc}); re-download the model") from None


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a Llama / Mistral / Qwen2 / Gemma 3 HF directory, from its config.json."""
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
    if arch == "gemma3":
        cfg = _gemma3_text_config(cfg)

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
    if scaling is None and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    # Qwen2 configs carry a sliding_window that is off unless use_sliding_window; Mistral's is on.
    use_window = bool(cfg.get("use_sliding_window", False)) if arch == "qwen2" else True
    config = ModelConfig(
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
    if arch == "gemma3":
        config = dataclasses.replace(config, **_gemma3_fields(cfg, config.num_layers, cfg_file))
    return config


# ---- Gemma 3 ----------------------------------------------------------------------------------------
_GEMMA3_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1,
}
"""Gemma3TextConfig's defaults: multimodal configs list only the text_config fields that differ."""


def _gemma3_text_config(cfg: dict) -> dict:
    """The text model's config (a Gemma3ForConditionalGeneration config nests it under text_config),
    over Gemma3TextConfig's defaults."""
    text = cfg.get("text_config") or cfg
    merged = {**_GEMMA3_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    for key in ("bos_token_id", "eos_token_id"):  # multimodal configs keep these at the top level
        if text is not cfg and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


def _gemma3_fields(cfg: dict, num_layers: int, cfg_file: str) -> dict:
    """Gemma 3's ModelConfig fields: layer types, per-type RoPE, attention scale, soft-capping."""
    if cfg.get("attn_logit_softcapping"):
        raise UnsupportedModelError(f"{cfg_file} sets attn_logit_softcapping; attention logit soft-capping "
                                    f"is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{cfg_file} sets use_bidirectional_attention (an embedding model); only "
                                    f"causal Gemma 3 is supported")
    layer_types = cfg.get("layer_types")
    if not layer_types:  # older configs: every sliding_window_pattern-th layer is global
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(num_layers)]
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:  # transformers >= 5: one dict per layer type
        global_rope, local_rope = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:  # transformers 4: rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones
        global_rope = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 1e6)}
        local_rope = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    if local_rope.get("rope_type", local_rope.get("type")) not in (None, "default"):
        raise UnsupportedModelError(f"{cfg_file}: RoPE scaling on the sliding-window layers is not supported")
    scaling = {k: v for k, v in global_rope.items() if k != "rope_theta"}
    softcap = cfg.get("final_logit_softcapping")
    return {
        "layer_types": tuple(layer_types),
        "sliding_window": int(cfg["sliding_window"]),
        "rope_theta": float(global_rope.get("rope_theta", 1e6)),
        "rope_scaling": scaling if scaling.get("rope_type", scaling.get("type")) not in (None, "default") else None,
        "rope_local_theta": float(local_rope.get("rope_theta", 10000.0)),
        "query_pre_attn_scalar": float(cfg["query_pre_attn_scalar"]),
        "final_logit_softcapping": float(softcap) if softcap else None,
        "hidden_activation": cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        "attention_bias": bool(cfg.get("attention_bias", False)),
    }


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
