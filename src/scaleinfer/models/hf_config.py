"""HF config.json (as a dict) -> ModelConfig, one reader per family; models/registry.py names them.

Each reader reads every field it uses by its HF key, with the default of that family's HF config class
where the key may be absent. weights/safetensors.py opens the file and picks the reader.
"""
from __future__ import annotations

import dataclasses
import os

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError


def _required(cfg: dict, key: str, cfg_file: str):
    if cfg.get(key) is None:
        raise WeightLoadError(f"{cfg_file} lacks {key!r}; the config is incomplete")
    return cfg[key]


def _eos_ids(eos) -> tuple[int, ...]:
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, HF-style rope_scaling or None): transformers >= 5 nests RoPE settings under
    rope_parameters; older configs keep them top-level."""
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return float(theta), scaling


def _decoder_config(cfg: dict, cfg_file: str, architecture: str, *, attention_bias: bool,
                    sliding_window: int | None) -> ModelConfig:
    """The fields every Llama-like config.json spells the same way."""
    num_heads = _required(cfg, "num_attention_heads", cfg_file)
    hidden_size = _required(cfg, "hidden_size", cfg_file)
    theta, scaling = _rope(cfg)
    return ModelConfig(
        architecture=architecture,
        vocab_size=_required(cfg, "vocab_size", cfg_file),
        hidden_size=hidden_size,
        intermediate_size=_required(cfg, "intermediate_size", cfg_file),
        num_layers=_required(cfg, "num_hidden_layers", cfg_file),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden_size // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        sliding_window=sliding_window,
        name=os.path.basename(os.path.dirname(os.path.normpath(cfg_file))),
    )


def read_llama(cfg: dict, cfg_file: str) -> ModelConfig:
    """Llama 1-3, SmolLM2, Mistral (whose sliding_window applies to every layer; Llama has none)."""
    return _decoder_config(cfg, cfg_file, "llama", attention_bias=bool(cfg.get("attention_bias", False)),
                           sliding_window=cfg.get("sliding_window"))


def read_qwen2(cfg: dict, cfg_file: str) -> ModelConfig:
    """Qwen2 / Qwen2.5: Q/K/V biases always; the sliding_window it carries is off unless use_sliding_window."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    return _decoder_config(cfg, cfg_file, "qwen2", attention_bias=True, sliding_window=window)


# ---- Gemma 3 ----------------------------------------------------------------------------------------
GEMMA3_TEXT_DEFAULTS = {
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
    merged = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    for key in ("bos_token_id", "eos_token_id"):  # multimodal configs keep these at the top level
        if text is not cfg and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


def read_gemma3(cfg: dict, cfg_file: str) -> ModelConfig:
    """Gemma 3 (text, or the text part of Gemma3ForConditionalGeneration): layer types, per-type RoPE,
    attention scale, soft-capping on top of the Llama-like fields."""
    cfg = _gemma3_text_config(cfg)
    if cfg.get("attn_logit_softcapping"):
        raise UnsupportedModelError(f"{cfg_file} sets attn_logit_softcapping; attention logit soft-capping "
                                    f"is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{cfg_file} sets use_bidirectional_attention (an embedding model); only "
                                    f"causal Gemma 3 is supported")
    num_layers = _required(cfg, "num_hidden_layers", cfg_file)
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
    base = _decoder_config(cfg, cfg_file, "gemma3", attention_bias=bool(cfg.get("attention_bias", False)),
                           sliding_window=int(cfg["sliding_window"]))
    return dataclasses.replace(
        base,
        layer_types=tuple(layer_types),
        rope_theta=float(global_rope.get("rope_theta", 1e6)),
        rope_scaling=scaling if scaling.get("rope_type", scaling.get("type")) not in (None, "default") else None,
        rope_local_theta=float(local_rope.get("rope_theta", 10000.0)),
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        final_logit_softcapping=float(softcap) if softcap else None,
        hidden_activation=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
    )
