"""Scheduler: decides, every engine step, which requests run and how many tokens each computes.

Fed by the engine (add / abort) and by the model runner's output (update). Pure Python.

There is no prefill phase and no decode phase. Each request has `num_computed_tokens` (K/V already
in the cache) and `num_tokens` (prompt + output so far); a step computes some of the difference.
One token budget per step is shared by everyone, which yields:

- continuous batching: new requests join and finished ones leave at every step;
- chunked prefill: a long prompt is computed over several steps, next to running decodes;
- preemption by recompute: when blocks run out, the most recently admitted request gives its
  blocks back and returns to the head of the waiting queue; it later recomputes prompt + output.

Running requests are served first (oldest first), then waiting ones (FCFS), and no new request is
admitted in a step that had to preempt.

Beam search (engine/beam_search.py): a beam (`beam_candidates` > 0) gets its top candidates stored
instead of a token, and waits with nothing to compute until its group picks the next tokens; a
running request with nothing to compute is skipped. If only such waiting beams run and the head of
the queue does not fit, the newest of them gives its blocks back (to the back of the queue: it keeps
its candidates) so its siblings can catch up.

Encoder-decoder sampling with n > 1 (Whisper's best_of): the children carry one `encoder_group`. The
first admitted runs the encoder; a sibling admitted later (or in the same step) while it runs takes its
cross blocks by reference count (BlockManager.share_cross) and is not sent to the encoder. A child
readmitted after a preemption shares again if a sibling still runs, else it runs the encoder again.
A request made with keep_encoder_output leaves its cross blocks behind when it finishes, for a later
request with the same encoder input (Whisper's temperature fallback): kv_cache/kept_encoder.py. Kept
blocks are given back first when running work needs blocks.

Copy-on-write copies of shared beam blocks travel in the SchedulerOutput to the runner.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scaleinfer.attention.patterns import AttentionPattern, union_live_ranges
from scaleinfer.config import CacheConfig, SchedulerConfig
from scaleinfer.kv_cache.block_manager import BlockManager
from scaleinfer.kv_cache.kept_encoder import KeptEncoderOutputs
from scaleinfer.request import FinishReason, Request, RequestStatus

DEAD_END = "grammar_dead_end"
"""stop_reason of a request whose structured-output grammar allowed no token (finish_reason "error")."""


@dataclass
class SchedulerOutput:
    """The contract between Scheduler and ModelRunner for one step.

    For request i, the runner computes tokens all_token_ids[num_computed : num_computed + n_i]
    (n_i = num_scheduled_tokens[i]) at positions num_computed.., writes their K/V into the slots of
    block_ids, and samples one new token iff the chunk reaches the end of the known tokens.
    `num_computed_tokens` is a snapshot taken at scheduling time.
    """

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) KV block copies (copy-on-write of forked beams) to run before the forward."""
    encoder_requests: list[Request] = field(default_factory=list)
    """Encoder-decoder requests admitted this step: the runner runs their encoder (batched) and stores
    their cross-attention K/V before the step's decoder forward (models/encoder_decoder.py)."""
    spec_token_ids: list[list[int]] = field(default_factory=list)
    """Per request, the draft tokens it checks this step (speculative decoding; [] for most): its
    num_scheduled_tokens is then 1 + len(drafts), the last known token followed by the drafts."""

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def needs_sample(self, i: int) -> bool:
        req = self.requests[i]
        return self.num_computed_tokens[i] + self.num_scheduled_tokens[i] == req.num_tokens

    def drafts(self, i: int) -> list[int]:
        """The draft tokens request i checks this step ([] when it does not speculate)."""
        return self.spec_token_ids[i] if self.spec_token_ids else []


@dataclass
class ModelOutput:
    """What the runner hands back: one sampled token per request whose needs_sample() was true."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple[float, dict[int, float]]] = field(default_factory=dict)
    candidates: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """Beam requests: their top (token ids, logprobs) instead of a sampled token."""
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    """Requests that checked drafts: the accepted drafts followed by the target's own next token."""
    spec_logprobs: dict[str, list[tuple[float, dict[int, float]]]] = field(default_factory=dict)


class Scheduler:
    share_encoder = True
    """Children of one n > 1 encoder-decoder request share the first one's encoder run and cross blocks;
    False: each runs its own encoder (tests compare the two)."""
    keep_encoder = True
    """Requests made with keep_encoder_output leave their cross blocks for a later request with the same
    encoder input; False: each runs its encoder (tests compare the two)."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 attention_patterns: Sequence[AttentionPattern] = ()) -> None:
        self.config = scheduler_config
        self.block_manager = BlockManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.kept_encoder = KeptEncoderOutputs(self.block_manager, scheduler_config.max_num_seqs)
        patterns = list(dict.fromkeys(attention_patterns))
        self.kv_patterns = patterns if patterns and not any(p.is_causal for p in patterns) else None
        """The layers' patterns when all of them bound their keys (KV blocks can then be dropped)."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def add_fork(self, parent: Request, child: Request) -> None:
        """A new beam of `parent` (engine/beam_search.py): it shares the parent's blocks and queue place."""
        self.block_manager.fork(parent, child)
        child.status = parent.status
        queue = self.running if parent.status == RequestStatus.RUNNING else self.waiting
        queue.insert(next(i for i, r in enumerate(queue) if r is parent) + 1, child)
        self.requests[child.request_id] = child

    def finish_request(self, request_id: str, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """End a request early (abort, or a stop string found by the detokenizer)."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, reason, stop_reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n == 0:   # a beam waiting for its group's next tokens
                i += 1
                continue
            drafts = self._drafts(req, n, budget)
            if drafts:
                n += len(drafts)
            target = req.num_computed_tokens + n
            self._make_room(req, target)
            while not bm.can_allocate(req, target):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                bm.allocate(req, target)
                self._add_to_output(out, req, n, drafts)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing left to run behind it

        encoder_budget = self.config.max_num_batched_tokens   # encoder states per step; the first always fits
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            needs_encoder = req.num_encoder_tokens > 0 and not req.cross_block_ids
            source = self._encoder_sibling(req) if needs_encoder else None
            if source is not None:   # its sibling's encoder ran (or runs first this step): share its cross K/V
                bm.share_cross(source, req)
                needs_encoder = False
            elif needs_encoder and self.keep_encoder and self.kept_encoder.take(req):
                needs_encoder = False   # an earlier request's encoder output for this very input
            if needs_encoder and out.encoder_requests and req.num_encoder_tokens > encoder_budget:
                break
            if not req.block_ids:
                req.num_computed_tokens = bm.match_prefix(req)
                req.num_cached_tokens = req.num_computed_tokens
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            target = req.num_computed_tokens + n
            self._make_room(req, target)
            if not bm.can_allocate(req, target):
                break
            bm.allocate(req, target)
            if needs_encoder:
                out.encoder_requests.append(req)
                encoder_budget -= req.num_encoder_tokens
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_to_output(out, req, n)
            budget -= n
        if out.is_empty and self.waiting and self.running and not out.preempted:
            self._preempt(self.running[-1], out, to_back=True)   # only waiting beams run: make room
        out.blocks_to_copy = bm.take_copies()
        return out

    def _make_room(self, req: Request, target: int) -> None:
        """Give back kept encoder outputs (oldest first) until req's next `target` tokens fit, or none is left."""
        while self.kept_encoder and not self.block_manager.can_allocate(req, target):
            self.kept_encoder.release_oldest()

    def release_encoder_output(self, encoder_input: object) -> None:
        """The owner of `encoder_input` will not decode it again: give back its kept cross blocks."""
        self.kept_encoder.release(encoder_input)

    def _encoder_sibling(self, req: Request) -> Request | None:
        """A running request of req's encoder group, with the same encoder input, that holds cross blocks."""
        if req.encoder_group is None or not self.share_encoder:
            return None
        return next((r for r in self.running if r.encoder_group == req.encoder_group
                     and r.encoder_input is req.encoder_input and r.cross_block_ids), None)

    def _drafts(self, req: Request, n: int, budget: int) -> list[int]:
        """The drafts a decoding request checks this step: its proposal, cut to the budget, the context,
        max_tokens (no point checking tokens it may not keep) and the free blocks ([] if none fit)."""
        if not req.spec_token_ids or n != 1:
            return []
        room = min(budget - 1, self.config.max_model_len - req.num_tokens - 1)
        max_tokens = req.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - req.num_output_tokens - 1)
        drafts = req.spec_token_ids[:max(0, room)]
        if drafts and not self.block_manager.can_allocate(req, req.num_computed_tokens + 1 + len(drafts)):
            return []   # no blocks to spare: decode normally (it may still preempt for its one token)
        return drafts

    @staticmethod
    def _add_to_output(out: SchedulerOutput, req: Request, n: int, drafts: list[int] | None = None) -> None:
        out.requests.append(req)
        out.num_scheduled_tokens.append(n)
        out.num_computed_tokens.append(req.num_computed_tokens)
        if drafts:
            if not out.spec_token_ids:
                out.spec_token_ids = [[] for _ in range(len(out.requests) - 1)]
            out.spec_token_ids.append(list(drafts))
        elif out.spec_token_ids:
            out.spec_token_ids.append([])

    def _preempt(self, req: Request, out: SchedulerOutput, to_back: bool = False) -> None:
        """Recompute-style preemption: drop the KV, requeue at the head of the waiting queue."""
        self.running.remove(req)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        if to_back:
            self.waiting.append(req)
        else:
            self.waiting.appendleft(req)
        out.preempted.append(req)

    # ---- after the model ran -------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, model_out: ModelOutput) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply stop rules; returns the requests
        that received a token this step (finished ones included)."""
        touched: list[Request] = []
        for req, n in zip(sched.requests, sched.num_scheduled_tokens):
            if req.is_finished:  # aborted while the step ran
                continue
            if req.request_id in model_out.spec_token_ids:
                self._update_verified(req, model_out)
                touched.append(req)
                continue
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req)
            if self.kv_patterns is not None:
                self.block_manager.free_dead_blocks(req, union_live_ranges(self.kv_patterns, req.num_computed_tokens))
            if req.beam_candidates and req.request_id in model_out.candidates:
                req.candidates = model_out.candidates[req.request_id]
                touched.append(req)   # its beam group appends the token it picks (engine/beam_search.py)
                continue
            token = model_out.sampled_token_ids.get(req.request_id)
            if token is None:
                continue
            req.append_output_token(token)
            if req.request_id in model_out.logprobs:
                req.output_logprobs.append(model_out.logprobs[req.request_id])
            touched.append(req)
            reason, stop_reason = self._check_stop(req, token)
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason, stop_reason)
        return touched

    def _update_verified(self, req: Request, model_out: ModelOutput) -> None:
        """A request that checked drafts: keep the KV of its last token and the accepted drafts only (the
        rejected ones' slots are overwritten later; blocks past the end go back), append the accepted run
        token by token and stop where a stop rule says, dropping the rest of the run."""
        tokens = model_out.spec_token_ids[req.request_id]
        logprobs = model_out.spec_logprobs.get(req.request_id)
        req.num_computed_tokens += len(tokens)   # the last known token + len(tokens) - 1 accepted drafts
        for j, token in enumerate(tokens):
            req.append_output_token(token)
            if logprobs is not None:
                req.output_logprobs.append(logprobs[j])
            reason, stop_reason = self._check_stop(req, token)
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason, stop_reason)
                return
        self.block_manager.trim(req, req.num_tokens)
        self.block_manager.cache_full_blocks(req)
        if self.kv_patterns is not None:
            self.block_manager.free_dead_blocks(req, union_live_ranges(self.kv_patterns, req.num_computed_tokens))

    def _check_stop(self, req: Request, token: int) -> tuple[FinishReason | None, int | str | None]:
        params = req.sampling_params
        if req.grammar is not None and req.grammar.dead_end:   # structured/bitmask.py: no token allowed
            return FinishReason.ERROR, DEAD_END
        if req.num_output_tokens > params.min_tokens:
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
            if not params.ignore_eos and token in req.eos_token_ids:
                return FinishReason.STOP, None
        if params.max_tokens is not None and req.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH, None
        if req.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.finish_time = time.monotonic()
        if req.keep_encoder_output and self.keep_encoder and req.cross_block_ids and reason != FinishReason.ABORT:
            self.kept_encoder.keep(req)
        self.block_manager.free(req)
        self.requests.pop(req.request_id, None)
