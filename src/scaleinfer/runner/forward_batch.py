"""ForwardBatch: the flat tensors of one step, built from a SchedulerOutput.

Requests are reordered so that query-length-1 requests (decodes) come first and are batched in
attention; `order` maps batch position -> index in the SchedulerOutput.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scaleinfer.attention.metadata import AttentionMetadata, build_metadata
from scaleinfer.attention.patterns import AttentionPattern
from scaleinfer.request import Request
from scaleinfer.scheduler import SchedulerOutput


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor          # [num_tokens]
    positions: torch.Tensor          # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor     # [num_samples] flat row of each sampled request's last token
    sample_requests: list[Request]   # the requests that get a token, in logits row order

    def to(self, device: torch.device | str) -> "ForwardBatch":
        if torch.device(device).type == "cpu":
            return self
        return ForwardBatch(self.input_ids.to(device), self.positions.to(device), self.meta.to(device),
                            self.logits_indices.to(device), self.sample_requests)


def build_forward_batch(sched: SchedulerOutput, block_size: int,
                        patterns: Sequence[AttentionPattern] = ()) -> ForwardBatch:
    order = sorted(range(len(sched.requests)), key=lambda i: sched.num_scheduled_tokens[i] != 1)
    input_ids: list[int] = []
    positions: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    logits_indices: list[int] = []
    sample_requests: list[Request] = []
    for i in order:
        req, n, start = sched.requests[i], sched.num_scheduled_tokens[i], sched.num_computed_tokens[i]
        input_ids.extend(req.all_token_ids[start:start + n])
        positions.extend(range(start, start + n))
        query_lens.append(n)
        context_lens.append(start + n)
        tables.append(req.block_ids)
        if sched.needs_sample(i):
            logits_indices.append(len(input_ids) - 1)
            sample_requests.append(req)
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        meta=build_metadata(query_lens, context_lens, tables, block_size, patterns),
        logits_indices=torch.tensor(logits_indices, dtype=torch.long),
        sample_requests=sample_requests,
    )
