"""The forward-time pieces of tensor parallelism, installed on a loaded model from outside
(distributed/sharding.py), as quantization swaps methods:

- RowParallel wraps the method of a row-parallel linear (o, down): its output is a partial sum over this
  rank's input columns, all-reduced across the group (the decode program does the same in C++);
- VocabParallelEmbedding looks up the ids of this rank's vocabulary rows (zeros for the others) and
  all-reduces, so every rank gets the full embeddings;
- GatherLogits wraps the LM head's method: each rank computes its vocabulary columns, rank 0 gets them
  side by side (the sampler runs there only); the other ranks' logits are their own shard.

A column-parallel linear (QKV, gate/up) needs no wrapper: each rank just holds fewer output rows.
`comm` is the group's communicator (distributed/communicators.py: all_reduce_, gather_last).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowParallel:
    """A linear method whose outputs are all-reduced across the tensor-parallel group."""

    def __init__(self, inner, comm):
        self.inner, self.comm = inner, comm

    def process_weights_after_loading(self, layer) -> None:
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce_(self.inner.apply(layer, x).contiguous())

    def __getattr__(self, name: str):   # decode_spec, dequantize, reference, name ...: the inner method's
        if name in ("inner", "comm"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class GatherLogits:
    """An LM head method: this rank's vocabulary columns, gathered on rank 0 (padding removed)."""

    def __init__(self, inner, comm, vocab_sizes: list[int]):
        self.inner, self.comm = inner, comm
        self.vocab_sizes = vocab_sizes
        """Vocabulary rows of each rank, in rank order (the last may hold fewer)."""
        self.padded = max(vocab_sizes)

    def process_weights_after_loading(self, layer) -> None:
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        local = self.inner.apply(layer, x)
        if local.shape[-1] < self.padded:
            local = F.pad(local, (0, self.padded - local.shape[-1]))
        full = self.comm.gather_last(local)
        if full is None:
            return local
        if all(v == self.padded for v in self.vocab_sizes):
            return full
        parts = full.split(self.padded, dim=-1)
        return torch.cat([p[..., :v] for p, v in zip(parts, self.vocab_sizes)], dim=-1)

    def __getattr__(self, name: str):
        if name in ("inner", "comm", "vocab_sizes", "padded"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class VocabParallelEmbedding(nn.Module):
    """An embedding of vocabulary rows [start, start + rows), summed across the group."""

    def __init__(self, weight: nn.Parameter, start: int, comm):
        super().__init__()
        self.weight = weight    # the very Parameter of the embedding it replaces (a tied LM head keeps it)
        self.start, self.comm = start, comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.comm.all_reduce_(out)
