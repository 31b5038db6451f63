"""Rotary position embeddings (Su et al. 2021, RoFormer), HF "rotate half" layout.

The cos/sin tables are computed once for max_position_embeddings; each step gathers the rows for
its positions once (`lookup`) and every layer reuses them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from scaleinfer.errors import UnsupportedModelError


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor (1.0 except for YaRN-like schemes)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        # Llama 3.1: long wavelengths scaled by `factor`, short kept, smooth blend in between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported; supported: linear, llama3")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq, attn_factor = _inv_freq(head_dim, theta, scaling)
        self.attn_factor = attn_factor
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        """[head_dim / 2]: also what attention patterns with positions=cache re-rotate sinks with."""
        self._inv_freq64 = inv_freq
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_position)

    def _build(self, num_positions: int) -> None:
        t = torch.arange(num_positions, dtype=torch.float64)
        freqs = torch.outer(t, self._inv_freq64)               # [num_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)               # [num_positions, head_dim]
        device = self.cos.device
        self.cos = (emb.cos() * self.attn_factor).float().to(device)
        self.sin = (emb.sin() * self.attn_factor).float().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: [num_tokens, 1, head_dim] each. Positions past the table
        (a stream under a distance-bounded attention pattern) grow it, doubling."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], int(positions.max()) + 1))
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim] -> rotated, same shape."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
