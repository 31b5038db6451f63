"""Build a ready-to-run model from a checkpoint: pick the family class, load weights, report time."""
from __future__ import annotations

import logging
import time

import torch

from scaleinfer.attention.backend import get_backend
from scaleinfer.config import EngineConfig
from scaleinfer.layers.linear import Linear
from scaleinfer.models import get_model_class
from scaleinfer.weights.loader import Checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(ckpt: Checkpoint, config: EngineConfig, attention_backend: str = "sdpa"):
    dtype = DTYPES[config.dtype]
    cls = get_model_class(ckpt.config.architecture)
    start = time.perf_counter()
    if config.cache.kv_cache_dtype == "int8":
        attention_backend = "sdpa-int8kv"
    model = cls(ckpt.config, get_backend(attention_backend), dtype)
    if ckpt.format == "scaleinfer-quantized":  # packed tensors go in as stored, no re-quantizing
        from scaleinfer.quantization.checkpoint import load_quantized

        return load_quantized(model, ckpt, config)
    loaded = model.load_weights(ckpt.tensors())
    missing = _missing_params(model, loaded)
    if missing:
        from scaleinfer.errors import WeightLoadError

        raise WeightLoadError(f"checkpoint {ckpt.path} lacks tensors: {', '.join(sorted(missing)[:5])}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
    if config.quantization != "none":
        from scaleinfer.quantization import apply_quantization

        apply_quantization(model, config.quantization, device=config.device)
    model.to(config.device).eval()
    logger.debug("weights loaded in %.2f s", time.perf_counter() - start)
    return model


def _missing_params(model, loaded: set[str]) -> set[str]:
    """Checkpoint names the model expected but never received (fused shards count separately)."""
    cfg = model.config
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                     p + "self_attn.o_proj.weight"}
        expected |= {p + f"self_attn.{x}_proj.weight" for x in "qkv"}
        expected |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if cfg.attention_bias:
            expected |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
    return expected - loaded
