"""Speculator: the engine's one handle on speculative decoding. Before each step it proposes drafts for
the running requests that are decoding (n-gram lookup or the draft model, k from the controller); after
the step it feeds the controller the step's time and each request's accepted count.

Requests with and without drafts share the step: a request without a proposal decodes as usual.
"""
from __future__ import annotations

from scaleinfer.config import SpeculativeConfig
from scaleinfer.request import Request
from scaleinfer.scheduler import ModelOutput, SchedulerOutput
from scaleinfer.spec_decode.controller import SpecController, SpecStats
from scaleinfer.spec_decode.ngram import ngram_propose

MAX_STEP_ROWS = 16
"""Most query rows of a decode step with drafts: the w4a8 / w8a8 decode kernels take up to 16 rows (each row
computed alone, so a row's logits do not depend on the batch); beyond that the GEMM path runs, slower at
these sizes and not bit-identical, so drafts are cut to keep the step within it."""


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft=None):
        """`draft`: a DraftProposer (engine/draft_proposer.py) for method draft, None for ngram."""
        self.config = config
        self.draft = draft
        self.controller = SpecController(config.num_speculative_tokens, config.adaptive,
                                         config.disable_by_batch_size, uses_draft_model=draft is not None)

    @property
    def stats(self) -> SpecStats:
        return self.controller.stats

    def propose(self, running: list[Request]) -> None:
        """Set spec_token_ids of the running requests that decode this step ([] for the others)."""
        candidates = []
        for req in running:
            req.spec_token_ids, req.spec_draft_probs = [], None
            left = req.sampling_params.max_tokens
            if req.num_tokens - req.num_computed_tokens == 1 and (left is None or left - req.num_output_tokens > 1) \
                    and _can_speculate(req):
                candidates.append(req)
        if self.draft is not None:
            self.draft.forget({r.request_id for r in running})
        self.controller.forget({r.request_id for r in running})
        if not candidates:
            return
        cfg, k_max = self.config, self.config.num_speculative_tokens
        if self.draft is None:
            proposals = {r.request_id: ngram_propose(r.all_token_ids, k_max, cfg.prompt_lookup_max,
                                                     cfg.prompt_lookup_min) for r in candidates}
            candidates = [r for r in candidates if proposals[r.request_id]]
        ks = _fit_rows(self.controller.choose_k([r.request_id for r in candidates], len(running)), len(running))
        if self.draft is None:
            for r in candidates:
                r.spec_token_ids = proposals[r.request_id][:ks[r.request_id]]
            return
        seconds = self.draft.propose([(r, ks[r.request_id]) for r in candidates])
        if seconds is not None:
            self.controller.observe_draft(seconds)

    def observe(self, sched: SchedulerOutput, model_out: ModelOutput, seconds: float) -> None:
        """After a step: its time (decode-only steps, by query rows) and each verified request's acceptance."""
        rows = sum(sched.num_scheduled_tokens)
        decode_only = all(n == 1 or sched.drafts(i) for i, n in enumerate(sched.num_scheduled_tokens))
        self.controller.observe_step(rows, seconds, decode_only)
        for i, req in enumerate(sched.requests):
            drafts = sched.drafts(i)
            kept = model_out.spec_token_ids.get(req.request_id)
            if drafts and kept is not None:
                self.controller.observe_verified(req.request_id, len(drafts), len(kept) - 1)


def _fit_rows(ks: dict[str, int], batch: int) -> dict[str, int]:
    """Lower the largest k's until the step's rows (one per request plus the drafts) fit MAX_STEP_ROWS."""
    ks = dict(ks)
    while ks and batch + sum(ks.values()) > MAX_STEP_ROWS and max(ks.values()) > 0:
        top = max(ks, key=ks.get)
        ks[top] -= 1
    return ks


def _can_speculate(req: Request) -> bool:
    """Verification rows carry no grammar mask, beam candidates or cross-attention: requests with structured
    outputs, beam search or an encoder decode one token at a time."""
    return req.grammar is None and not req.beam_candidates and not req.num_encoder_tokens
