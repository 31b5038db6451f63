"""Attention: the module models call. Holds shapes and the backend; K/V caches and metadata come in
as arguments (explicit state, no forward context)."""
from __future__ import annotations

import torch
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend,
                 pattern: AttentionPattern = CAUSAL):
        super().__init__()
        self.pattern = pattern
        """Which keys each query attends (patterns.py); the engine may override it per server."""
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.register_buffer("rope_inv_freq", None, persistent=False)
        """The layer's RoPE inverse frequencies (set_rope), needed by patterns with positions=cache
        (StreamingLLM), which re-rotate sinks; a buffer so that it follows the model's device."""

    def set_rope(self, inv_freq: torch.Tensor) -> None:
        self.rope_inv_freq = inv_freq.detach().clone()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]."""
        return self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta.for_pattern(self.pattern), self.scale,
                                    rope=self.rope_inv_freq)


def layer_patterns(model: nn.Module) -> list[AttentionPattern]:
    """The pattern of each Attention module of `model`, in layer order."""
    return [m.pattern for m in model.modules() if isinstance(m, Attention)]


def set_attention_pattern(model: nn.Module, pattern: AttentionPattern) -> None:
    """Override every layer's pattern (e.g. sinks + window on a model trained with full attention)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.pattern = pattern
