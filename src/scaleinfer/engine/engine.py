"""LLMEngine: add_request / abort_request / step. One step = schedule, run the model, update, detokenize.

Fed by LLM (offline) and AsyncEngine (server). Not thread-safe: one thread drives it.
A request with n > 1 is fanned out into n child requests that share the prompt (and, for an
encoder-decoder, one encoder run and its cross blocks: scheduler.py); their outputs are gathered back
under the parent id.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from scaleinfer.attention.patterns import parse_pattern, union_live_ranges
from scaleinfer.config import ALLOW_LONG_ENV, EngineConfig, allow_long_max_model_len
from scaleinfer.distributed.pipeline import PipelineExecutor
from scaleinfer.distributed.executor import UniProcExecutor
from scaleinfer.engine.beam_search import BeamGroup, check_beam_fits
from scaleinfer.engine.encoder_inputs import request_inputs
from scaleinfer.engine.launch import create_executor
from scaleinfer.engine.loading import DTYPES
from scaleinfer.engine.outputs import Child, Parent, make_output
from scaleinfer.engine.virtual_engines import VirtualEngines
from scaleinfer.errors import ConfigError, RequestError
from scaleinfer.kv_cache.cache_tensors import bytes_per_token
from scaleinfer.models.encoder_decoder import encoder_decoder_class
from scaleinfer.request import FinishReason, Request, RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.scheduler import Scheduler
from scaleinfer.structured.bitmask import GrammarState
from scaleinfer.structured.compiler import GrammarCompiler
from scaleinfer.tokenizer import IncrementalDetokenizer
from scaleinfer.weights.loader import open_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    max_batch_size: int = 0
    """Most requests that ran in one step (continuous batching made visible)."""
    last_batch_size: int = 0


def position_limit(cfg) -> int:
    """Longest sequence the model's positions cover: max_position_embeddings, times the factor of a
    YaRN / dynamic-NTK rope_scaling whose original length is that same number (e.g. Qwen2.5's
    "factor": 4 on 32k); linear and llama3 checkpoints already state their extended length."""
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings")
    if kind in ("yarn", "dynamic") and factor and (original is None or original >= cfg.max_position_embeddings):
        return int(cfg.max_position_embeddings * float(factor))
    return cfg.max_position_embeddings


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if config.attention_pattern is not None:
            parse_pattern(config.attention_pattern)   # a bad pattern fails before any weight is read
        start = time.perf_counter()
        ckpt = open_checkpoint(config.model)
        self.model_config = ckpt.config
        self.checkpoint_path = ckpt.path
        self.tokenizer = ckpt.tokenizer
        if config.parallel.distributed and encoder_decoder_class(ckpt.config.architecture):
            raise ConfigError(f"{ckpt.config.architecture} is an encoder-decoder model: tensor and pipeline "
                              f"parallelism do not take it yet; run it in one process (data parallel replicas work)")
        self.executor = create_executor(config, ckpt)
        self.runner = self.executor.runner
        """This process's ModelRunner (rank 0's shard under tensor parallelism)."""
        self.model = self.runner.model
        self.attention_patterns = self.runner.patterns
        self.load_time = time.perf_counter() - start

        dtype = DTYPES[config.dtype]
        num_blocks = self.runner.num_blocks
        self.max_model_len = config.scheduler.max_model_len
        limit = position_limit(self.model_config)
        if not all(p.distance_bounded for p in self.attention_patterns) and self.max_model_len > limit:
            # Beyond its trained positions a model sees query-key distances it never learned. Patterns
            # whose distances stay bounded (a window; sinks with positions=cache) may stream past them.
            if allow_long_max_model_len():
                logger.warning("max_model_len %d exceeds the model's %d positions (%s=1): outputs past them "
                               "are not meaningful", self.max_model_len, limit, ALLOW_LONG_ENV)
            else:
                self.max_model_len = limit
        sched_cfg = config.scheduler
        if sched_cfg.max_model_len != self.max_model_len:
            from dataclasses import replace

            sched_cfg = replace(sched_cfg, max_model_len=self.max_model_len)
        micro = self._micro_batches()
        if micro > 1:   # several steps in flight through the pipeline (engine/virtual_engines.py)
            self.scheduler = VirtualEngines(sched_cfg, config.cache, num_blocks, self.attention_patterns, micro)
            num_blocks = self.scheduler.blocks_each   # what one request can hold
        else:
            self.scheduler = Scheduler(sched_cfg, config.cache, num_blocks, self.attention_patterns)
        self.num_kv_blocks = num_blocks
        self.kv_capacity_tokens = num_blocks * config.cache.block_size
        self.kv_bytes_per_token = bytes_per_token(self.runner.model_config, dtype, config.cache.kv_cache_dtype,
                                                 config.device)
        """KV bytes of one token on each rank (its KV heads)."""
        self.stats = EngineStats()
        self._grammars = None   # structured.GrammarCompiler, made at the first structured request
        from scaleinfer.engine.speculative import build_speculator

        self.speculator = build_speculator(config, self.tokenizer, self.model_config.vocab_size)
        """Speculative decoding (spec_decode/), or None when off."""
        self._parents: dict[str, Parent] = {}
        self._parent_of: dict[str, str] = {}
        self._beams: dict[str, BeamGroup] = {}
        """Beam-search requests by id (engine/beam_search.py); their beams are `{id}#b{k}` in the scheduler."""
        self._next_id = 0
        logger.info(
            "model %s (%s, %d layers) loaded in %.1f s; dtype %s; KV cache %d tokens (%d blocks of %d, %.0f MiB); "
            "threads %d", self.model_config.name or config.model, self.model_config.architecture,
            self.model_config.num_layers, self.load_time, config.dtype, self.kv_capacity_tokens, num_blocks,
            config.cache.block_size, num_blocks * config.cache.block_size * self.kv_bytes_per_token / 2**20,
            torch.get_num_threads())

    def _micro_batches(self) -> int:
        """Steps in flight: 1, or under pipeline parallelism one per stage unless configured."""
        pc = self.config.parallel
        if not isinstance(self.executor, PipelineExecutor):
            return 1
        return pc.steps_in_flight

    # ---- requests ----------------------------------------------------------------------------
    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def add_request(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams,
                    encoder_input: "torch.Tensor | None" = None, keep_encoder_output: bool = False) -> None:
        """`encoder_input`: an encoder-decoder model's encoder input (engine/encoder_inputs.py; `prompt` is
        then the decoder prompt, None for the model's default). `keep_encoder_output`: keep its encoder
        output (cross blocks) after the request for a later one with this very `encoder_input` object,
        until `release_encoder_output(encoder_input)` or the blocks are needed (kv_cache/kept_encoder.py)."""
        if request_id in self._parents or request_id in self._beams:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_text, prompt_ids, encoder_input, num_encoder_tokens = request_inputs(
            self.model, self.model_config.architecture, self.tokenizer, prompt, encoder_input)
        self._validate(prompt_ids, params, num_encoder_tokens)
        compiled = self.compile_structured(params)
        if params.use_beam_search:
            self._add_beam_request(request_id, prompt_text, prompt_ids, params, encoder_input, num_encoder_tokens,
                                   keep_encoder_output)
            return
        parent = Parent(request_id, prompt_text, prompt_ids)
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                from dataclasses import replace

                seed = None if params.seed is None else params.seed + i
                child_params = replace(params, n=1, seed=seed)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(child_id, prompt_ids, child_params, eos_token_ids=self.tokenizer.eos_token_ids,
                          prompt=prompt_text, encoder_input=encoder_input, num_encoder_tokens=num_encoder_tokens,
                          encoder_group=request_id if params.n > 1 and num_encoder_tokens else None,
                          keep_encoder_output=keep_encoder_output and num_encoder_tokens > 0)
            if compiled is not None:
                req.grammar = GrammarState(compiled, self._grammars.stop_token_ids, self._grammars.vocab_size)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params.skip_special_tokens,
                                           child_params.stop_strings, child_params.include_stop_str_in_output)
            parent.children.append(Child(req, detok))
            self._parent_of[child_id] = request_id
            self.scheduler.add_request(req)
        self._parents[request_id] = parent

    def release_encoder_output(self, encoder_input) -> None:
        """Give back the encoder output kept for `encoder_input` (add_request's keep_encoder_output)."""
        self.scheduler.release_encoder_output(encoder_input)

    def compile_structured(self, params: SamplingParams):
        """The compiled grammar of params.structured_outputs (cached), None without one; RequestError if it
        is invalid. Thread-safe: the server calls it on its own threads to refuse a bad schema early."""
        if params.structured_outputs is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        return self._grammars.compile(params.structured_outputs)

    def _add_beam_request(self, request_id: str, prompt_text: str | None, prompt_ids: list[int],
                          params: SamplingParams, encoder_input=None, num_encoder_tokens: int = 0,
                          keep_encoder_output: bool = False) -> None:
        if not isinstance(self.executor, UniProcExecutor):
            raise RequestError("beam search runs on a one-process engine (tensor / pipeline parallel ranks do not "
                               "copy KV blocks yet); drop use_beam_search or serve without parallelism")
        check_beam_fits(params, len(prompt_ids), num_encoder_tokens, self.config.cache.block_size, self.num_kv_blocks)
        group = BeamGroup(request_id, prompt_text, prompt_ids, params, self.tokenizer.eos_token_ids,
                          self.tokenizer, self.max_model_len, encoder_input, num_encoder_tokens)
        group.beams[0].request.keep_encoder_output = keep_encoder_output   # its forks copy it (Request.fork)
        self._beams[request_id] = group
        self.scheduler.add_request(group.beams[0].request)

    def kv_tokens_needed(self, num_tokens: int) -> int:
        """KV slots a request of `num_tokens` tokens holds at its peak: all of them under causal
        attention; under bounded patterns (window, sinks) what the pattern keeps plus one prefill chunk."""
        patterns = self.scheduler.kv_patterns
        if patterns is None:
            return num_tokens
        live = sum(e - s for s, e in union_live_ranges(patterns, num_tokens))
        bs = self.config.cache.block_size
        return min(num_tokens, live + self.config.scheduler.max_num_batched_tokens + 2 * bs)

    def _validate(self, prompt_ids: list[int], params: SamplingParams, num_encoder_tokens: int = 0) -> None:
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty; send at least one token")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens but the context is {self.max_model_len} tokens (room is needed for "
                f"at least one output token); shorten the prompt or raise --max-model-len")
        bs = self.config.cache.block_size
        if self.kv_tokens_needed(n + 1) + -(-num_encoder_tokens // bs) * bs > self.kv_capacity_tokens:
            raise RequestError(
                f"the prompt has {n} tokens but the KV cache holds only {self.kv_capacity_tokens}; "
                f"raise --kv-cache-memory")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        group = self._beams.pop(request_id, None)
        if group is not None:
            group.finish(self.scheduler)
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            self._parent_of.pop(child.request.request_id, None)
            self.scheduler.finish_request(child.request.request_id, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents or self._beams)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents) + len(self._beams)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if isinstance(self.scheduler, VirtualEngines):
            return [out for sched, touched in self.scheduler.step(self.executor)
                    for out in self._outputs(sched, touched)]
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        start = time.perf_counter()
        model_out = self.executor.execute(sched)
        if self.speculator is not None:
            self.speculator.observe(sched, model_out, time.perf_counter() - start)
        return self._outputs(sched, self.scheduler.update(sched, model_out))

    def _outputs(self, sched, touched: list[Request]) -> list[RequestOutput]:
        """After a step's update: statistics, text deltas, the outputs of the requests it touched."""
        self._record(sched, touched)
        parents: dict[str, Parent] = {}
        groups: dict[str, BeamGroup] = {}
        for req in touched:
            parent_id = self._parent_of.get(req.request_id)
            if parent_id is None:
                group_id = BeamGroup.group_id(req.request_id)
                if req.beam_candidates and group_id in self._beams:
                    groups[group_id] = self._beams[group_id]
                continue
            parent = self._parents[parent_id]
            child = next(c for c in parent.children if c.request is req)
            self._detokenize(child)
            parents[parent_id] = parent
        outputs = [make_output(p) for p in parents.values()]
        for group_id, group in groups.items():
            if group.ready():
                group.advance(self.scheduler)
            if group.done:
                outputs.append(self._beams.pop(group_id).output())
        for out in outputs:
            if out.finished and out.request_id in self._parents:
                parent = self._parents.pop(out.request_id)
                for child in parent.children:
                    self._parent_of.pop(child.request.request_id, None)
        return outputs

    def _record(self, sched, touched: list[Request]) -> None:
        self.stats.num_steps += 1
        self.stats.last_batch_size = len(sched.requests)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(sched.requests))
        self.stats.num_generation_tokens += sum(self._new_tokens(req) for req in touched)
        for req, n, start in zip(sched.requests, sched.num_scheduled_tokens, sched.num_computed_tokens):
            self.stats.num_prompt_tokens += max(0, min(start + n, req.num_prompt_tokens) - start)

    def _new_tokens(self, req: Request) -> int:
        """Output tokens of `req` not yet detokenized (1, or more after accepted draft tokens)."""
        parent_id = self._parent_of.get(req.request_id)
        if parent_id is None:
            return 1
        child = next(c for c in self._parents[parent_id].children if c.request is req)
        return req.num_output_tokens - child.num_detokenized

    def _detokenize(self, child: Child) -> None:
        req, detok = child.request, child.detokenizer
        new = req.output_token_ids[child.num_detokenized:]
        for j, token in enumerate(new):   # one at a time: a stop string inside an accepted run ends it there
            detok.add_tokens([token])
            if detok.stop_string is not None:
                req.truncate_output(child.num_detokenized + j + 1)
                break
        child.num_detokenized = req.num_output_tokens
        if detok.stop_string is not None:
            if not req.is_finished:
                self.scheduler.finish_request(req.request_id, FinishReason.STOP, detok.stop_string)
            else:  # the same token also hit a length limit: the stop string wins, as in vLLM
                req.finish_reason, req.stop_reason = FinishReason.STOP, detok.stop_string
        elif req.is_finished:
            detok.flush()

    def compute_logits(self, token_ids: list[int]) -> "torch.Tensor":
        """[len, vocab] logits of every position of one sequence (parity tests, perplexity).

        Blocks come from the block manager like any request's, so cached prefixes stay intact.
        """
        self._validate(token_ids, SamplingParams(max_tokens=1))
        self._drain()
        probe = Request(f"logits-{self.new_request_id()}", list(token_ids), SamplingParams(max_tokens=1))
        bm = self.scheduler.block_manager
        if not bm.can_allocate(probe, len(token_ids)):
            raise RequestError(f"{len(token_ids)} tokens do not fit in the free KV cache; "
                               f"raise --kv-cache-memory or wait for running requests")
        bm.allocate(probe, len(token_ids))
        try:
            return self.executor.compute_logits(token_ids, probe.block_ids)
        finally:
            bm.free(probe)

    def score_stream(self, token_ids: list[int], chunk: int = 512) -> "torch.Tensor":
        """Log-probability of each next token of one long sequence ([len - 1]), computed chunk by chunk
        through the paged cache with the KV policy applied after each chunk: the path a streaming
        request takes, with every position scored. Under a bounded pattern the KV held stays bounded."""
        if not token_ids:
            raise RequestError("nothing to score: the token list is empty")
        if len(token_ids) > self.max_model_len:
            raise RequestError(f"{len(token_ids)} tokens exceed the context of {self.max_model_len} tokens; "
                               f"raise --max-model-len (patterns with bounded distances may exceed the model's)")
        probe = Request(f"score-{self.new_request_id()}", list(token_ids), SamplingParams(max_tokens=1))
        bm, patterns = self.scheduler.block_manager, self.scheduler.kv_patterns
        targets = torch.tensor(token_ids[1:] + [0])
        self._drain()
        out = []
        try:
            for start in range(0, len(token_ids), chunk):
                end = min(start + chunk, len(token_ids))
                if not bm.can_allocate(probe, end):
                    raise RequestError(f"the KV cache is full at token {start}; raise --kv-cache-memory")
                bm.allocate(probe, end)
                logits = self.executor.compute_logits(token_ids[start:end], probe.block_ids, num_cached=start)
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                out.append(logprobs.gather(1, targets[start:end].to(logprobs.device).unsqueeze(1)).squeeze(1).cpu())
                probe.num_computed_tokens = end
                if patterns is not None:
                    bm.free_dead_blocks(probe, union_live_ranges(patterns, end))
        finally:
            bm.free(probe)
        return torch.cat(out)[:-1]

    def shutdown(self) -> None:
        """Stop the other ranks of a distributed engine (a no-op in one process)."""
        try:
            self._drain()
        finally:
            self.executor.shutdown()

    def _drain(self) -> None:
        """Collect every step still in flight through a pipeline (before a probe, or stopping)."""
        if isinstance(self.scheduler, VirtualEngines) and self.executor.dead is None:
            self.scheduler.drain(self.executor)

    # ---- introspection -----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    @property
    def kv_cache_usage(self) -> float:
        return self.scheduler.block_manager.usage

