"""The draft-model proposer: a smaller model that shares the target's tokenizer guesses k tokens per step.

It has its own ModelRunner (weights, paged KV cache, decode program) and its own BlockManager; per target
request it keeps a shadow sequence: the draft's block table and how many of the request's tokens its KV
holds. Each proposal round, for every request at once:

    catch up   the tokens the draft has not seen (the whole prompt once; afterwards the accepted drafts
               and the target's token: 1 or 2 tokens) as decode rows, or a prefill chunk when many;
    draft      k - 1 more batched one-token steps, sampling each draft from the draft's logits.

Rollback is free: the draft's valid KV is the prefix the target kept, min(draft computed, target
computed), because the target's num_computed_tokens counts exactly its kept tokens; the slots past it
are overwritten by the next round. A request whose shadow cannot get blocks simply gets no drafts.
Greedy requests draft the argmax; sampled ones draw from the draft's processed distribution q (kept on
the request for the rejection sampler).
"""
from __future__ import annotations

import logging
import time

import torch

from scaleinfer.kv_cache.block_manager import BlockManager
from scaleinfer.request import Request
from scaleinfer.runner.forward_batch import StepInputs
from scaleinfer.runner.model_runner import ModelRunner
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.spec_decode.rejection import draft_uniform, processed_probs, rows_metadata
from scaleinfer.sampler import sample_inverse_cdf

logger = logging.getLogger(__name__)

MAX_CATCH_UP_ROWS = 8
"""Unseen tokens up to this many go in as decode rows (the fast path); more as one prefill chunk."""


class DraftProposer:
    def __init__(self, runner: ModelRunner, target_vocab_size: int):
        self.runner = runner
        self.target_vocab_size = target_vocab_size
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size)
        self._shadows: dict[str, Request] = {}
        self.num_forwards = 0
        self.seconds = 0.0

    def forget(self, live_request_ids: set[str]) -> None:
        """Free the shadows of requests that are no longer running."""
        for rid in [r for r in self._shadows if r not in live_request_ids]:
            self.block_manager.free(self._shadows.pop(rid))

    def propose(self, items: list[tuple[Request, int]]) -> float | None:
        """Set spec_token_ids (and spec_draft_probs for sampled requests) of each (request, k); returns the
        mean seconds of one draft forward of this round (None if nothing ran)."""
        ready = [(req, k, shadow) for req, k in items if k > 0
                 for shadow in [self._shadow(req, k)] if shadow is not None]
        if not ready:
            return None
        start, forwards = time.perf_counter(), 0
        drafts: dict[str, list[int]] = {req.request_id: [] for req, _, _ in ready}
        probs: dict[str, list[torch.Tensor]] = {req.request_id: [] for req, _, _ in ready}
        active = ready
        for j in range(max(k for _, k, _ in ready)):
            active = [(req, k, sh) for req, k, sh in active if k > j]
            if not active:
                break
            logits = self.runner.forward_inputs(self._inputs(active, drafts, first=j == 0))
            forwards += 1
            self._sample(active, logits, drafts, probs)
        for req, k, shadow in ready:
            shadow.num_computed_tokens = req.num_tokens + k - 1
            ids = drafts[req.request_id]
            cut = next((i for i, t in enumerate(ids) if t >= self.target_vocab_size), len(ids))
            req.spec_token_ids = ids[:cut]
            req.spec_draft_probs = torch.stack(probs[req.request_id][:cut]) if probs[req.request_id] and cut else None
        seconds = time.perf_counter() - start
        self.num_forwards += forwards
        self.seconds += seconds
        return seconds / forwards

    def _shadow(self, req: Request, k: int) -> Request | None:
        """The request's shadow with blocks for its tokens plus k - 1 drafts, its computed count rolled
        back to the target's kept prefix; None (and freed) when the draft's cache is full."""
        shadow = self._shadows.get(req.request_id)
        if shadow is None:
            shadow = Request(req.request_id, [], SamplingParams(max_tokens=1))
            self._shadows[req.request_id] = shadow
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, req.num_computed_tokens)
        need = req.num_tokens + k - 1
        if not self.block_manager.can_allocate(shadow, need):
            self.block_manager.free(self._shadows.pop(req.request_id))
            return None
        self.block_manager.allocate(shadow, need)
        return shadow

    @staticmethod
    def _inputs(active, drafts: dict[str, list[int]], first: bool) -> StepInputs:
        """The rows of one draft forward: catch-up tokens (first), else each request's latest draft;
        decode rows first (the attention metadata's layout), logits of each request's last row."""
        rows: list[tuple[int, int, int, list[int], list[int]]] = []   # (owner, query len, context len, table, ids)
        for owner, (req, _, shadow) in enumerate(active):
            if first:
                start = shadow.num_computed_tokens
                ids = req.all_token_ids[start:]
            else:
                start = req.num_tokens - 1 + len(drafts[req.request_id])
                ids = drafts[req.request_id][-1:]
            if len(ids) <= MAX_CATCH_UP_ROWS:
                rows.extend((owner, 1, start + i + 1, shadow.block_ids, [t]) for i, t in enumerate(ids))
            else:
                rows.append((owner, len(ids), start + len(ids), shadow.block_ids, ids))
        rows.sort(key=lambda r: r[1] != 1)   # stable: each request's decode rows stay in order
        inputs = StepInputs()
        last_row = [0] * len(active)
        for owner, q, c, table, ids in rows:
            inputs.query_lens.append(q)
            inputs.context_lens.append(c)
            inputs.tables.append(list(table))
            inputs.input_ids.extend(ids)
            inputs.positions.extend(range(c - q, c))
            last_row[owner] = len(inputs.input_ids) - 1
        inputs.logits_indices = last_row
        return inputs

    def _sample(self, active, logits: torch.Tensor, drafts, probs) -> None:
        """Append one draft per active request: the argmax for greedy requests, else a draw from q."""
        greedy = logits.argmax(dim=-1).tolist()
        sampled = [i for i, (req, _, _) in enumerate(active) if req.sampling_params.temperature > 0]
        q = None
        if sampled:
            group = [(active[i][0], drafts[active[i][0].request_id]) for i in sampled]
            meta = rows_metadata(group, logits.shape[-1], last_only=True)
            q = processed_probs(logits.index_select(0, torch.tensor(sampled, device=logits.device)), meta)
        for row, (req, _, _) in enumerate(active):
            rid = req.request_id
            if q is not None and row in sampled:
                qi = q[sampled.index(row)]
                u = self._uniform(req, len(drafts[rid]))
                drafts[rid].append(int(sample_inverse_cdf(qi.unsqueeze(0), torch.tensor([u], dtype=torch.float64))[0]))
                probs[rid].append(qi)
            else:
                drafts[rid].append(greedy[row])

    def _uniform(self, req: Request, j: int) -> float:
        seed = req.sampling_params.seed
        if seed is None:
            return self.runner.sampler.random(1)[0]
        return draft_uniform(seed, req.num_output_tokens + j)
