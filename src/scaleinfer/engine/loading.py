"""Build a ready-to-run model from a checkpoint: pick the family class, load weights, report time."""
from __future__ import annotations

import logging
import time

import torch

from scaleinfer.attention.backend import get_backend
from scaleinfer.config import EngineConfig
from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear
from scaleinfer.models import get_model_class
from scaleinfer.weights.loader import Checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(ckpt: Checkpoint, config: EngineConfig, attention_backend: str | None = None):
    if ckpt.format == "scaleinfer-quantized" and config.calibration is not None:
        raise ConfigError(f"{ckpt.path} is already quantized; calibrate when quantizing the original model")
    dtype = DTYPES[config.dtype]
    cls = get_model_class(ckpt.config.architecture)
    start = time.perf_counter()
    if attention_backend is None:  # fused kernels on CPU (they step aside for what they do not cover)
        attention_backend = "cpu" if config.device == "cpu" else "sdpa"   # both take every KV cache dtype
    model = cls(ckpt.config, get_backend(attention_backend), dtype)
    if ckpt.format == "scaleinfer-quantized":  # packed tensors go in as stored, no re-quantizing
        from scaleinfer.weights.quantized import load_quantized

        return load_quantized(model, ckpt, config)
    from scaleinfer.quantization.base import resolve_mode, takes_packed_int4

    mode = resolve_mode(config.quantization, config.device)
    windows = _calibration_windows(ckpt, config.calibration, mode) if config.calibration is not None else None
    # int4 group 32 (int4, w4a8) takes GGUF 4-bit weights as stored: exact, and no float round trip.
    loaded = model.load_weights(ckpt.tensors(direct_int4=ckpt.direct_int4 and takes_packed_int4(mode)))
    missing = _missing_params(model, loaded)
    if missing:
        from scaleinfer.errors import WeightLoadError

        raise WeightLoadError(f"checkpoint {ckpt.path} lacks tensors: {', '.join(sorted(missing)[:5])}")
    if windows is not None:  # GPTQ: the decoder linears come out as packed shards (quantization/gptq.py)
        from scaleinfer.config import CacheConfig
        from scaleinfer.quantization.base import decoder_method
        from scaleinfer.quantization.gptq import gptq_quantize_model
        from scaleinfer.runner.model_runner import ModelRunner

        cache = CacheConfig(kv_cache_dtype="float32")   # calibration statistics from unrounded K/V
        blocks = -(-max(map(len, windows)) // cache.block_size) + 1
        runner = ModelRunner(model, ckpt.config, cache, blocks, torch.float32, "cpu")
        method = decoder_method(mode)
        gptq_quantize_model(model, lambda ids: runner.compute_logits(ids, rows=torch.tensor([len(ids) - 1])),
                            windows, method.group_size, method.half_scales)   # LM head for one row only
    if mode != "none":
        from scaleinfer.quantization import apply_quantization

        apply_quantization(model, mode, device=config.device)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight is not None:  # the layers left dense
            module.materialize_packed()
            module.quant_method.process_weights_after_loading(module)
    model.to(config.device).eval()
    logger.debug("weights loaded in %.2f s", time.perf_counter() - start)
    return model


def _calibration_windows(ckpt: Checkpoint, path: str, mode: str) -> list[list[int]]:
    """Token windows of the calibration text file `path`, checked before any weight is loaded."""
    from scaleinfer.quantization.base import calibrated_modes
    from scaleinfer.quantization.gptq import calibration_windows

    if mode not in calibrated_modes():
        raise ConfigError(f"--calibration applies to --quantization {', '.join(calibrated_modes())}, not {mode}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the calibration text {path!r}: {e}") from None
    try:
        return calibration_windows(ckpt.tokenizer, text)
    except ValueError as e:
        raise ConfigError(f"--calibration {path}: {e}") from None


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


def quantize_to_dir(model: str, mode: str, output: str, *, overwrite: bool = False,
                    calibration: str | None = None) -> dict:
    """`scaleinfer quantize`: open `model`, quantize it as the engine would, write `output`."""
    from scaleinfer.config import QUANTIZATION_MODES, EngineConfig
    from scaleinfer.quantization.base import resolve_mode
    from scaleinfer.weights.loader import open_checkpoint
    from scaleinfer.weights.quantized import FORMAT, prepare_output_dir, save_quantized

    mode = resolve_mode(mode, "cpu")
    if mode == "none":
        choices = ", ".join(m for m in QUANTIZATION_MODES if m not in ("none", "auto"))
        raise ConfigError(f"--quantization none writes nothing; choose one of {choices}")
    prepare_output_dir(output, overwrite)
    start = time.perf_counter()
    ckpt = open_checkpoint(model)
    if ckpt.format == FORMAT:
        raise ConfigError(f"{model!r} is already a quantized checkpoint; quantize the original model")
    built = build_model(ckpt, EngineConfig(model=model, quantization=mode, device="cpu", calibration=calibration))
    config = save_quantized(built, ckpt, mode, output, source=model, calibration=calibration)
    logger.info("quantized %s (%s) to %s in %.1f s", model, mode, output, time.perf_counter() - start)
    return config
