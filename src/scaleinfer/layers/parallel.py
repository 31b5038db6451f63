"""The forward-time pieces of tensor parallelism, installed on a loaded model from outside
(distributed/sharding.py), as quantization swaps methods:

- RowParallel wraps the method of a row-parallel linear (o, down): its output is a partial sum over this
  rank's input columns, all-reduced across the group (the decode program does the same in C++); a method
  that rounds activations per row (w8a8) first gets each row's maximum over the group, so every rank
  rounds on one process's scale (a scale per shard made Gemma 3's logits drift by 0.2-0.3; per-channel
  int8 weights get their whole rows' scale the same way, distributed/sharding.py: share_row_amax);
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


def group_max(comm, local: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of `local` over the group, from the sum collective: each rank fills its own
    row of a zeroed [world, n] buffer, the sum gives every rank every row (adding zeros is exact)."""
    rows = torch.zeros(comm.world_size, local.numel(), dtype=local.dtype)
    rows[comm.rank] = local.reshape(-1)
    return comm.all_reduce_(rows).amax(dim=0).view_as(local)


class RowParallel:
    """A linear method whose outputs are all-reduced across the tensor-parallel group."""

    def __init__(self, inner, comm):
        self.inner, self.comm = inner, comm

    def process_weights_after_loading(self, layer) -> None:
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.inner, "name", None) == "w8a8":   # per-token int8 activations: round on the whole row's scale
            y = self.inner.apply(layer, x, group_amax=lambda local: group_max(self.comm, local))
            return self.comm.all_reduce_(y.contiguous())
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
