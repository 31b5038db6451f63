"""Attention: the module models call. Holds shapes and the backend; K/V caches and metadata come in
as arguments (explicit state, no forward context)."""
from __future__ import annotations

import torch
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]."""
        return self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
