"""ModelRunner: owns the model, the KV cache tensors and the sampler; executes one scheduled step.

    SchedulerOutput -> ForwardBatch -> decode program | model.forward -> logits -> Sampler -> ModelOutput

A decode-only step that the decode program covers (runner/decode_program.py) runs through it; every
other step, and every step with `lean_decode` off, through the model's own forward (the reference).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future

import torch

from scaleinfer.attention.kv_int8 import key_channel_scale
from scaleinfer.attention.layer import layer_patterns
from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.kv_cache.cache_tensors import allocate_kv_caches, copy_blocks
from scaleinfer.models.interface import CausalLM, DecoderWeights
from scaleinfer.runner.decode_program import DecodePlan
from scaleinfer.runner.encoder_step import run_encoders
from scaleinfer.runner.forward_batch import ForwardBatch, StepInputs, batch_from_inputs, build_forward_batch
from scaleinfer.sampler import Sampler, SamplingMetadata
from scaleinfer.scheduler import ModelOutput, SchedulerOutput
from scaleinfer.structured.bitmask import MaskPrefetch, advance, fill_bitmask
from scaleinfer.spec_decode.rejection import verify

logger = logging.getLogger(__name__)


def int8_key_scales(weights: DecoderWeights) -> list[torch.Tensor]:
    """Per layer, the int8 KV cache's key channel divisors (attention/kv_int8.py: key_channel_scale)
    from the K rows of the fused QKV weight (dequantized if the method packed it), their bias and the
    input norm weight. Only a Llama-shaped layer (no K norm) gives keys this formula describes."""
    h, h_kv, d = weights.num_heads, weights.num_kv_heads, weights.head_dim
    rows = slice(h * d, (h + h_kv) * d)
    out = []
    for layer in weights.layers:
        qkv = layer.qkv
        w = qkv.weight if qkv.weight is not None else qkv.quant_method.dequantize(qkv)
        bias = qkv.bias[rows] if qkv.bias is not None else None
        out.append(key_channel_scale(w[rows], bias, layer.input_norm, h_kv, d))
    return out


def beam_candidates(reqs: list, logits: torch.Tensor) -> dict[str, tuple[list[int], list[float]]]:
    """Beam requests' top candidates: log_softmax of the raw logits, then the request's logits
    processors applied to those log-probabilities (HF's beam search order: a ban is not renormalised)."""
    rows = [row for row, r in enumerate(reqs) if r.beam_candidates]
    lps = torch.log_softmax(logits[rows].float(), dim=-1)
    out = {}
    for i, row in enumerate(rows):
        req = reqs[row]
        for fn in req.sampling_params.logits_processors or ():
            lps[i] = fn(req.output_token_ids, lps[i])
        top_lps, top_ids = lps[i].topk(min(req.beam_candidates, lps.shape[-1]))
        out[req.request_id] = (top_ids.tolist(), top_lps.tolist())
    return out


class ModelRunner:
    lean_decode = True
    """Run decode-only steps through the decode program where it covers them; False sends every step
    through model.forward (tests compare the two)."""
    prefetch_masks = True
    """Fill structured-output grammar masks on a worker thread during the forward (False: after it)."""

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
        """The config the model was built from (one shard's under tensor parallelism)."""
        self.num_blocks = num_blocks
        self.block_size = cache_config.block_size
        self.kv_caches = allocate_kv_caches(model_config, num_blocks, self.block_size, dtype, device,
                                            cache_config.kv_cache_dtype)
        if cache_config.kv_cache_dtype == "int8" and hasattr(model, "decode_layers"):
            for (k_cache, _), c in zip(self.kv_caches, int8_key_scales(model.decode_layers())):
                k_cache.channel_scale = c.to(self.device)   # attention/kv_int8.py: per-channel key scales
        self.sampler = Sampler(seed)   # draws for requests without a seed of their own (EngineConfig.seed)
        self.patterns = layer_patterns(model)
        """The attention pattern of every layer, in order; metadata gets a view per distinct one."""
        self.decode_plan: DecodePlan | None = None
        """The decode program, built at the first decode-only step (None: not built, or not covered)."""
        self._plan_built = False
        self.mask_prefetch = MaskPrefetch()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        if sched.blocks_to_copy:
            copy_blocks(self.kv_caches, sched.blocks_to_copy, self.block_size)
        if sched.encoder_requests:   # encoder-decoder: encoders first, their cross K/V into the cache
            run_encoders(self.model, self.kv_caches, sched.encoder_requests, self.block_size, self.device)
        return self.execute_batch(build_forward_batch(sched, self.block_size, self.patterns))

    @torch.inference_mode()
    def execute_batch(self, batch: ForwardBatch) -> ModelOutput:
        """Run one step's batch and sample its requests."""
        batch = batch.to(self.device)
        # Structured outputs: the grammar masks are filled while the model runs (structured/bitmask.py).
        mask = self.mask_prefetch.start(batch.sample_requests) if self.prefetch_masks else None
        if batch.cross_meta is not None:   # encoder-decoder (models/encoder_decoder.py): the model's forward
            logits = self.model.forward(batch.input_ids, batch.positions, self.kv_caches, batch.meta,
                                        batch.logits_indices, cross_meta=batch.cross_meta)
        else:
            logits = self._forward(batch.input_ids, batch.positions, batch.meta, batch.logits_indices)
        return self.sample(batch, logits, mask)

    @torch.inference_mode()
    def sample(self, batch: ForwardBatch, logits: torch.Tensor, mask: Future | None = None) -> ModelOutput:
        """The batch's sampled tokens (and logprobs) from its logits; `mask`: the grammar bitmask being
        filled (MaskPrefetch), else it is filled here when a request has a grammar."""
        out = ModelOutput()
        if batch.spec_requests:   # their k + 1 rows each follow the ordinary rows
            verify(self.sampler, logits[len(batch.sample_requests):], batch.spec_requests, out)
            logits = logits[:len(batch.sample_requests)]
        if not batch.sample_requests:
            return out
        reqs = batch.sample_requests
        grammar_mask = mask.result() if mask is not None else None
        if mask is None and any(r.grammar is not None for r in reqs):
            grammar_mask = fill_bitmask(reqs)
        if any(r.beam_candidates for r in reqs):
            out.candidates = beam_candidates(reqs, logits)
        for row, req in enumerate(reqs):
            for fn in req.sampling_params.logits_processors or ():
                logits[row] = fn(req.output_token_ids, logits[row])
        meta = SamplingMetadata.from_params(
            [r.sampling_params for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.sampling_params.seed for r in reqs],
            reqs[0].eos_token_ids,
            logits.shape[-1],
        )
        meta.grammar_mask = grammar_mask
        result = self.sampler(logits, meta)
        token_ids = result.sampled_token_ids.tolist()
        if grammar_mask is not None:
            advance(reqs, token_ids)
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
        return self.forward_inputs(self.logits_inputs(token_ids, block_ids, num_cached, rows))

    def logits_inputs(self, token_ids: list[int], block_ids: list[int] | None = None, num_cached: int = 0,
                      rows: torch.Tensor | None = None) -> StepInputs:
        """compute_logits's step as StepInputs (what a distributed engine sends its other ranks)."""
        n = len(token_ids)
        total = num_cached + n
        if block_ids is None:
            block_ids = list(range(-(-total // self.block_size)))
        rows_list = list(range(n)) if rows is None else [int(r) for r in rows.tolist()]
        return StepInputs([n], [total], [list(block_ids)], list(token_ids), rows_list, list(range(num_cached, total)))

    @torch.inference_mode()
    def forward_inputs(self, inputs: StepInputs) -> torch.Tensor:
        """The logits of a step given as StepInputs (no sampling): compute_logits, and every step of a
        worker rank (whose logits are its vocabulary shard; rank 0 gets them gathered)."""
        batch = batch_from_inputs(inputs, self.block_size, self.patterns).to(self.device)
        return self._forward(batch.input_ids, batch.positions, batch.meta, batch.logits_indices)

    def _forward(self, input_ids, positions, meta, logits_indices) -> torch.Tensor:
        """Logits of `logits_indices`: through the decode program for a decode-only step it covers,
        else through model.forward."""
        if self.lean_decode and not meta.prefills and meta.num_decode_tokens == input_ids.shape[0]:
            plan = self._current_plan()
            if plan is not None:
                logits = plan.run(input_ids, positions, self.kv_caches, meta, logits_indices)
                if logits is not None:
                    return logits
        return self.model.forward(input_ids, positions, self.kv_caches, meta, logits_indices)

    @torch.inference_mode()
    def forward_stage(self, batch: ForwardBatch, stream: torch.Tensor | None, last: bool) -> torch.Tensor:
        """A pipeline stage's part of a step (distributed/pipeline.py): from the token ids (`stream` None:
        the first stage) or the residual stream the previous stage sent, through this runner's layers
        (the decode program where it covers the step), to the logits (`last`) or the stream to send on."""
        batch = batch.to(self.device)
        x = self.model.embed(batch.input_ids) if stream is None else stream
        out = None
        if self.lean_decode and not batch.meta.prefills and batch.meta.num_decode_tokens == x.shape[0]:
            plan = self._current_plan()
            out = None if plan is None else plan.run_layers(x, batch.positions, batch.meta)
        if out is None:
            out = self.model.run_layers(x, None, batch.positions, self.kv_caches, batch.meta)
        x, residual = out
        if last:
            return self.model.compute_head(x, residual, batch.logits_indices)
        return x if residual is None else x + residual

    def _current_plan(self) -> DecodePlan | None:
        """The decode program, rebuilt when a quantization method, KV cache or attention pattern it was
        built with has been swapped since; a model it does not cover is not asked again."""
        if not self._plan_built or (self.decode_plan is not None and not self.decode_plan.current(self.kv_caches)):
            self.decode_plan = DecodePlan.build(self.model, self.kv_caches)
            self._plan_built = True
        return self.decode_plan
