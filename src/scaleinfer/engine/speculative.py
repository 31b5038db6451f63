"""Builds the engine's Speculator from SpeculativeConfig: n-gram lookup, or a draft model loaded next to
the target (its own weights, KV cache and runner; same device, dtype and quantization rules)."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from scaleinfer.config import EngineConfig, ParallelConfig, SpeculativeConfig
from scaleinfer.engine.loading import DTYPES, build_model
from scaleinfer.errors import ConfigError
from scaleinfer.kv_cache.cache_tensors import num_blocks_for_budget
from scaleinfer.runner.model_runner import ModelRunner
from scaleinfer.engine.draft_proposer import DraftProposer
from scaleinfer.spec_decode.speculator import Speculator
from scaleinfer.weights.loader import open_checkpoint

logger = logging.getLogger(__name__)

_PROBE_TEXT = "def main():\n    print('Hello, world!')  # 你好 1234"
DRAFT_QUANTIZATION = "w8a8"
"""What an unquantized draft checkpoint (HF safetensors) is quantized to on the CPU under --quantization auto:
auto would leave it fp32, and then its fp32 weights and LM head cost as much memory traffic per draft token as
a whole step of a quantized target (a 12-layer fp32 draft of a 30-layer Q4 SmolLM2 took ~0.9x a target step
per draft token). w8a8, not w4a8: the distilled 12-layer SmolLM2 draft kept its fp32 acceptance (0.163) at
w8a8 but fell to 0.058 at w4a8. A draft only proposes: its precision changes acceptance, never the output."""


def build_speculator(config: EngineConfig, tokenizer, vocab_size: int) -> Speculator | None:
    """The Speculator `config.speculative` asks for (None when off). `tokenizer` and `vocab_size`: the
    target's (a draft model must tokenize alike)."""
    spec = config.speculative
    if not spec.enabled:
        return None
    if config.parallel.pipeline_parallel_size > 1:
        raise ConfigError("speculative decoding does not run with --pipeline-parallel-size > 1; "
                          "use tensor parallelism or drop --speculative-method")
    if spec.method == "ngram":
        logger.info("speculative decoding: n-gram prompt lookup, k <= %d%s", spec.num_speculative_tokens,
                    " (adaptive)" if spec.adaptive else "")
        return Speculator(spec)
    start = time.perf_counter()
    ckpt = open_checkpoint(spec.model)
    _check_tokenizer(spec, tokenizer, ckpt.tokenizer)
    draft_config = replace(config, model=spec.model, calibration=None, attention_pattern=None,
                           quantization=draft_quantization(config, bool(ckpt.stored_types)),
                           cache=replace(config.cache, kv_cache_memory=spec.draft_kv_cache_memory,
                                         enable_prefix_caching=False),
                           parallel=ParallelConfig(), speculative=SpeculativeConfig())
    model = build_model(ckpt, draft_config)
    dtype = DTYPES[config.dtype]
    blocks = num_blocks_for_budget(ckpt.config, draft_config.cache, dtype, config.device)
    runner = ModelRunner(model, ckpt.config, draft_config.cache, blocks, dtype, config.device, seed=config.seed + 1)
    logger.info("speculative decoding: draft model %s (%d layers) loaded in %.1f s, k <= %d%s", spec.model,
                ckpt.config.num_layers, time.perf_counter() - start, spec.num_speculative_tokens,
                " (adaptive)" if spec.adaptive else "")
    return Speculator(spec, DraftProposer(runner, vocab_size))


def draft_quantization(config: EngineConfig, stored: bool) -> str:
    """The draft's --quantization: the target's, except that auto on the CPU quantizes a draft checkpoint
    that stores no quantized tensors (`stored` False) to DRAFT_QUANTIZATION instead of leaving it dense."""
    if config.quantization == "auto" and config.device == "cpu" and not stored:
        return DRAFT_QUANTIZATION
    return config.quantization


def _check_tokenizer(spec: SpeculativeConfig, target, draft) -> None:
    """A draft model must map text to the same ids as the target (its tokens are the target's input)."""
    if target.encode(_PROBE_TEXT) != draft.encode(_PROBE_TEXT):
        raise ConfigError(f"--speculative-model {spec.model!r} does not share the target model's tokenizer; "
                          f"choose a smaller model of the same family (e.g. qwen2.5-coder-0.5b-instruct for "
                          f"qwen2.5-coder-1.5b-instruct)")
