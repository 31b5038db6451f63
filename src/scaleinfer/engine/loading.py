"""Build a ready-to-run model from a checkpoint: its family's class, the weights loaded, quantized, timed."""
from __future__ import annotations

import logging
import time

import torch

from scaleinfer.attention.backend import get_backend
from scaleinfer.config import EngineConfig
from scaleinfer.distributed.sharding import (TPShard, install_tensor_parallel, shard_config, shard_tensors,
                                             share_row_amax)
from scaleinfer.distributed.stages import PPStage, finish_stage, prepare_stage, stage_tensors
from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear
from scaleinfer.models import registry
from scaleinfer.weights.load_into import linear_types, load_into
from scaleinfer.weights.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(ckpt: Checkpoint, config: EngineConfig, attention_backend: str | None = None,
                shard: TPShard | None = None, comm=None, stage: PPStage | None = None):
    """The model of `ckpt` as `config` asks, loaded and quantized; with `shard` (tensor parallelism) only
    this rank's part of it (distributed/sharding.py), its collectives on `comm`; with `stage` (pipeline
    parallelism) only the stage's layers (distributed/stages.py)."""
    if ckpt.format == "scaleinfer-quantized" and config.calibration is not None:
        raise ConfigError(f"{ckpt.path} is already quantized; calibrate when quantizing the original model")
    if (shard is not None or stage is not None) and (ckpt.format == "scaleinfer-quantized" or config.calibration is not None):
        raise ConfigError("tensor and pipeline parallelism do not yet take pre-quantized checkpoints or --calibration; "
                          "load the original model with --quantization")
    dtype = DTYPES[config.dtype]
    family = registry.family(ckpt.config.architecture)
    start = time.perf_counter()
    if attention_backend is None:  # fused kernels on CPU (they step aside for what they do not cover)
        attention_backend = "cpu" if config.device == "cpu" else "sdpa"   # both take every KV cache dtype
    model_cfg = ckpt.config if shard is None else shard_config(ckpt.config, shard)
    model = family.model_class(model_cfg, get_backend(attention_backend), dtype)
    tied = ckpt.config.tie_word_embeddings
    if stage is not None:
        prepare_stage(model, stage, tied)
    if ckpt.format == "scaleinfer-quantized":  # packed tensors go in as stored, no re-quantizing
        from scaleinfer.weights.quantized import load_quantized

        return load_quantized(model, ckpt, config)
    from scaleinfer.quantization.base import resolve_mode, takes_packed_int4

    mode = resolve_mode(config.quantization, config.device, stored=bool(ckpt.stored_types))
    windows = _calibration_windows(ckpt, config.calibration, mode) if config.calibration is not None else None
    # int4 group 32 (int4, w4a8, auto) takes GGUF 4-bit weights as stored: exact, and no float round trip.
    tensors = ckpt.tensors(direct_int4=ckpt.direct_int4 and takes_packed_int4(mode))
    if shard is not None:
        tensors = shard_tensors(tensors, shard, ckpt.config, family.checkpoint_name)
    if stage is not None:
        tensors = stage_tensors(tensors, stage, tied, family.checkpoint_name)
    placed = load_into(model, family, tensors, ckpt.config.tie_word_embeddings, source=f"checkpoint {ckpt.path}")
    if windows is not None:
        _gptq(model, ckpt, mode, windows)
    if shard is not None and mode != "none":
        share_row_amax(model, comm)
    if mode == "auto":   # each linear by how the checkpoint stored it (quantization/auto.py)
        from scaleinfer.quantization.auto import apply_auto

        apply_auto(model, linear_types(placed, ckpt.stored_types, ckpt.config.tie_word_embeddings))
    elif mode != "none":
        from scaleinfer.quantization import apply_quantization

        apply_quantization(model, mode, device=config.device)
    model.to(config.device).eval()   # first: a dense layer's layout depends on where it runs (layers/linear.py)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight is not None:  # the layers left dense
            module.materialize_packed()
            module.quant_method.process_weights_after_loading(module)
    if shard is not None:
        install_tensor_parallel(model, shard, comm)
    if stage is not None:
        finish_stage(model, stage)
    logger.debug("weights loaded in %.2f s", time.perf_counter() - start)
    return model


def _gptq(model, ckpt: Checkpoint, mode: str, windows: list[list[int]]) -> None:
    """GPTQ-round the decoder linears on `windows`: they come out as packed shards (quantization/gptq.py)."""
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


def _calibration_windows(ckpt: Checkpoint, path: str, mode: str) -> list[list[int]]:
    """Token windows of the calibration text file `path`, checked before any weight is loaded."""
    from scaleinfer.quantization.base import calibrated_modes
    from scaleinfer.quantization.gptq import calibration_file_windows

    if mode not in calibrated_modes():
        raise ConfigError(f"--calibration applies to --quantization {', '.join(calibrated_modes())}, not {mode}")
    return calibration_file_windows(ckpt.tokenizer, path)


def quantize_to_dir(model: str, mode: str, output: str, *, overwrite: bool = False,
                    calibration: str | None = None) -> dict:
    """`scaleinfer quantize`: open `model`, quantize it as the engine would, write `output`."""
    from scaleinfer.config import QUANTIZATION_MODES, EngineConfig
    from scaleinfer.quantization.base import resolve_mode
    from scaleinfer.weights.loader import open_checkpoint
    from scaleinfer.weights.quantized import FORMAT, prepare_output_dir, save_quantized

    mode = resolve_mode(mode, "cpu")
    if mode in ("none", "auto"):
        choices = ", ".join(m for m in QUANTIZATION_MODES if m not in ("none", "auto"))
        raise ConfigError(f"--quantization {mode} writes nothing new; choose one of {choices}")
    prepare_output_dir(output, overwrite)
    start = time.perf_counter()
    ckpt = open_checkpoint(model)
    if ckpt.format == FORMAT:
        raise ConfigError(f"{model!r} is already a quantized checkpoint; quantize the original model")
    built = build_model(ckpt, EngineConfig(model=model, quantization=mode, device="cpu", calibration=calibration))
    config = save_quantized(built, ckpt, mode, output, source=model, calibration=calibration)
    logger.info("quantized %s (%s) to %s in %.1f s", model, mode, output, time.perf_counter() - start)
    return config
