"""ModelRunner: owns the model, the KV cache tensors and the sampler; executes one scheduled step.

    SchedulerOutput -> ForwardBatch -> model.forward -> logits -> Sampler -> ModelOutput
"""
from __future__ import annotations

import logging

import torch

from scaleinfer.attention.layer import layer_patterns
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.kv_cache.cache_tensors import allocate_kv_caches
from scaleinfer.models.interface import CausalLM
from scaleinfer.runner.forward_batch import build_forward_batch
from scaleinfer.sampler import Sampler, SamplingMetadata
from scaleinfer.scheduler import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, model_config: ModelConfig, cache_config: CacheConfig,
                 num_blocks: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # cuDNN's SDPA builds an execution plan per shape; with a new context length every step
            # that costs ~0.5 ms of CPU per call (H100, bf16: 565 vs 3385 tok/s on 64 requests). Set
            # once for the process; flash / memory-efficient kernels need no plans.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model_config = model_config
        self.block_size = cache_config.block_size
        self.kv_caches = allocate_kv_caches(model_config, num_blocks, self.block_size, dtype, device,
                                            cache_config.kv_cache_dtype)
        if cache_config.kv_cache_dtype == "int8" and hasattr(model, "key_channel_scales"):
            for (k_cache, _), c in zip(self.kv_caches, model.key_channel_scales()):
                k_cache.channel_scale = c.to(self.device)   # quantization/kv_int8.py: per-channel key scales
        self.sampler = Sampler(seed)   # draws for requests without a seed of their own (EngineConfig.seed)
        self.patterns = layer_patterns(model)
        """The attention pattern of every layer, in order; metadata gets a view per distinct one."""

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        batch = build_forward_batch(sched, self.block_size, self.patterns).to(self.device)
        logits = self.model.forward(batch.input_ids, batch.positions, self.kv_caches, batch.meta,
                                    batch.logits_indices)
        out = ModelOutput()
        if not batch.sample_requests:
            return out
        reqs = batch.sample_requests
        meta = SamplingMetadata.from_params(
            [r.sampling_params for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.sampling_params.seed for r in reqs],
            reqs[0].eos_token_ids,
            logits.shape[-1],
        )
        result = self.sampler(logits, meta)
        token_ids = result.sampled_token_ids.tolist()
        for row, (req, token) in enumerate(zip(reqs, token_ids)):
            out.sampled_token_ids[req.request_id] = token
        if result.logprobs is not None:
            sampled_lp = result.logprobs.tolist()
            top_ids = result.top_logprob_ids.tolist()
            top_lps = result.top_logprobs.tolist()
            for row, req in enumerate(reqs):
                k = req.sampling_params.logprobs
                if k is None:
                    continue
                out.logprobs[req.request_id] = (sampled_lp[row], dict(zip(top_ids[row][:k], top_lps[row][:k])))
        return out

    def compute_logits(self, token_ids: list[int], block_ids: list[int] | None = None,
                       num_cached: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every position of `token_ids`, a chunk that follows `num_cached` tokens already in
        the cache (evaluation helper), through the paged cache and the layers' attention patterns.

        `block_ids` are blocks the caller allocated for it (LLMEngine.compute_logits does); without
        them blocks [0, ceil(len / block_size)) are used, which is only safe on an idle engine with
        prefix caching off. `rows`: the positions (within the chunk) to compute logits for; all by default.
        """
        from scaleinfer.attention.metadata import build_metadata

        n = len(token_ids)
        total = num_cached + n
        if block_ids is None:
            block_ids = list(range(-(-total // self.block_size)))
        meta = build_metadata([n], [total], [block_ids], self.block_size, self.patterns)
        with torch.inference_mode():
            positions = torch.arange(num_cached, total, device=self.device)
            rows = torch.arange(n) if rows is None else rows
            return self.model.forward(torch.tensor(token_ids, device=self.device), positions, self.kv_caches,
                                      meta.to(self.device), rows.to(self.device))
