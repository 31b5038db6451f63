"""ForwardBatch: the flat tensors of one step, built from a SchedulerOutput; StepInputs: the same step as a
few flat int lists, which is all another rank needs to run it (encoded as one int64 tensor to broadcast).

Requests are reordered so that query-length-1 requests (decodes) come first and are batched in
attention; `order` maps batch position -> index in the SchedulerOutput.

A request that checks k draft tokens (speculative decoding) becomes k + 1 decode rows: row j holds token
j of [last known token, drafts...] at its own position with the context up to it, all rows share the
request's block table. The step writes every row's K/V before any row attends (the decode kernels and
the reference alike), so row j sees exactly its causal prefix, and the whole check runs through the
decode fast path (runner/decode_program.py) instead of a prefill chunk. Their logits rows come after
those of the ordinary requests.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from scaleinfer.attention.metadata import AttentionMetadata, build_metadata
from scaleinfer.attention.patterns import AttentionPattern
from scaleinfer.request import Request
from scaleinfer.runner.encoder_step import cross_step_metadata
from scaleinfer.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    """One step's model inputs as plain ints: per request its query length, context length (cached +
    new tokens) and block table; the flat new token ids; the rows that need logits. Positions follow:
    request i's new tokens sit at context_len - query_len ... context_len - 1."""

    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    """Of each input id (derived from the lengths, so not encoded)."""

    def encode(self, op: int) -> torch.Tensor:
        """[op, R, T, L, len(table_0) .. len(table_R-1), query_lens, context_lens, tables, ids, rows]."""
        flat = [op, len(self.query_lens), len(self.input_ids), len(self.logits_indices)]
        flat += [len(t) for t in self.tables]
        flat += self.query_lens + self.context_lens
        for t in self.tables:
            flat += t
        flat += self.input_ids + self.logits_indices
        return torch.tensor(flat, dtype=torch.long)

    @staticmethod
    def decode(msg: torch.Tensor) -> tuple[int, "StepInputs"]:
        """Inverse of encode: (op, inputs)."""
        v = msg.tolist()
        op, r, t, n_logits = v[:4]
        pos = 4 + r
        table_lens = v[4:pos]
        query_lens, context_lens = v[pos:pos + r], v[pos + r:pos + 2 * r]
        pos += 2 * r
        tables = []
        for n in table_lens:
            tables.append(v[pos:pos + n])
            pos += n
        positions: list[int] = []
        for q, c in zip(query_lens, context_lens):
            positions.extend(range(c - q, c))
        return op, StepInputs(query_lens, context_lens, tables, v[pos:pos + t], v[pos + t:pos + t + n_logits],
                              positions)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor          # [num_tokens]
    positions: torch.Tensor          # [num_tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor     # [num_samples] flat row of each sampled request's last token
    sample_requests: list[Request]   # the requests that get a token, in logits row order
    inputs: StepInputs | None = None
    """The step as plain ints (what the other ranks of a distributed engine are sent)."""
    cross_meta: AttentionMetadata | None = None
    """Cross-attention reads of an encoder-decoder model's step (runner/encoder_step.py); else None."""
    spec_requests: list[tuple[Request, list[int]]] = field(default_factory=list)
    """Requests that check drafts, with their drafts: request i's k + 1 logits rows follow the
    ordinary requests' rows and the earlier spec requests' rows."""

    def to(self, device: torch.device | str) -> "ForwardBatch":
        if torch.device(device).type == "cpu":
            return self
        return ForwardBatch(self.input_ids.to(device), self.positions.to(device), self.meta.to(device),
                            self.logits_indices.to(device), self.sample_requests, self.inputs,
                            cross_meta=None if self.cross_meta is None else self.cross_meta.to(device),
                            spec_requests=self.spec_requests)


def step_inputs(sched: SchedulerOutput) -> tuple[StepInputs, list[Request]]:
    """The step's inputs (decodes first) and the requests that sample, in logits row order."""
    inputs, sample_requests, _ = spec_step_inputs(sched)
    return inputs, sample_requests


def spec_step_inputs(sched: SchedulerOutput) -> tuple[StepInputs, list[Request], list[tuple[Request, list[int]]]]:
    """step_inputs, plus the requests that check drafts (each as k + 1 decode rows, see the module
    docstring) with their drafts; their logits rows follow the ordinary ones."""
    order = sorted(range(len(sched.requests)), key=lambda i: sched.num_scheduled_tokens[i] != 1
                   and not sched.drafts(i))
    inputs = StepInputs()
    sample_requests: list[Request] = []
    spec_requests: list[tuple[Request, list[int]]] = []
    spec_rows: list[int] = []
    for i in order:
        req, n, start = sched.requests[i], sched.num_scheduled_tokens[i], sched.num_computed_tokens[i]
        drafts = sched.drafts(i)
        if drafts:
            for j, token in enumerate(req.all_token_ids[start:start + 1] + drafts):
                inputs.input_ids.append(token)
                inputs.positions.append(start + j)
                inputs.query_lens.append(1)
                inputs.context_lens.append(start + j + 1)
                inputs.tables.append(req.block_ids)
                spec_rows.append(len(inputs.input_ids) - 1)
            spec_requests.append((req, drafts))
            continue
        inputs.input_ids.extend(req.all_token_ids[start:start + n])
        inputs.positions.extend(range(start, start + n))
        inputs.query_lens.append(n)
        inputs.context_lens.append(start + n)
        inputs.tables.append(req.block_ids)
        if sched.needs_sample(i):
            inputs.logits_indices.append(len(inputs.input_ids) - 1)
            sample_requests.append(req)
    inputs.logits_indices.extend(spec_rows)
    return inputs, sample_requests, spec_requests


def batch_from_inputs(inputs: StepInputs, block_size: int, patterns: Sequence[AttentionPattern] = (),
                      sample_requests: list[Request] | None = None,
                      spec_requests: list[tuple[Request, list[int]]] | None = None) -> ForwardBatch:
    return ForwardBatch(
        input_ids=torch.tensor(inputs.input_ids, dtype=torch.long),
        positions=torch.tensor(inputs.positions, dtype=torch.long),
        meta=build_metadata(inputs.query_lens, inputs.context_lens, inputs.tables, block_size, patterns),
        logits_indices=torch.tensor(inputs.logits_indices, dtype=torch.long),
        sample_requests=sample_requests or [],
        inputs=inputs,
        spec_requests=spec_requests or [],
    )


def build_forward_batch(sched: SchedulerOutput, block_size: int,
                        patterns: Sequence[AttentionPattern] = ()) -> ForwardBatch:
    inputs, sample_requests, spec_requests = spec_step_inputs(sched)
    batch = batch_from_inputs(inputs, block_size, patterns, sample_requests, spec_requests)
    batch.cross_meta = cross_step_metadata(sched, block_size)
    return batch
