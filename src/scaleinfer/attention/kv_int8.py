"""int8 KV cache: K and V stored as int8 with one fp32 scale per (token, KV head); an SDPA backend on it.

Per token and head, s = max|x| / 127 over head_dim and q = round(x / s): 1 byte per element plus
4 bytes per head-vector, i.e. (head_dim + 4) / (4 * head_dim) of fp32 (0.27x at head_dim 64) and
about half of fp16.

Keys can carry a fixed per-channel scale c [heads, head_dim] (`channel_scale`, computed from the
weights by `key_channel_scale`, set by the runner): k is stored as quantize(k / c) and read back times c. Keys have
a few channels far larger than the rest in every token (Qwen2's K bias: KIVI, Liu et al. 2024, quantize
keys per channel for this reason); one per-token scale then leaves the small channels with a handful of
levels. Dividing by c ~ sqrt(channel magnitude) (SmoothQuant's migration strength 0.5) evens them out.
c is equal on the two channels RoPE rotates together, so it holds at every position. Qwen2.5-0.5B,
hongloumeng, 6 windows: fp32 KV 270.29, per-token int8 280.82 (+3.9%), with c 270.44 (+0.05%).

Everything attention reads goes through the quantized copy, including a prompt's
own K/V in the step that writes them, so what a later decode step sees is what every query saw
(and perplexity measured in one prefill window shows the cost). Dequantized K/V then take the
reference SDPA path (attention/sdpa.py), the oracle this backend is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.attention.sdpa import SdpaBackend


@dataclass
class Int8KV:
    """One of K or V for one layer: data [num_slots, num_kv_heads, head_dim] int8, scale [num_slots, num_kv_heads]."""

    data: torch.Tensor
    scale: torch.Tensor
    channel_scale: torch.Tensor | None = None
    """Optional [heads, head_dim] divisor applied before quantizing (keys, see the module doc)."""

    @classmethod
    def empty(cls, num_slots: int, num_kv_heads: int, head_dim: int, device="cpu",
              channel_scale: torch.Tensor | None = None) -> "Int8KV":
        return cls(torch.empty(num_slots, num_kv_heads, head_dim, dtype=torch.int8, device=device),
                   torch.empty(num_slots, num_kv_heads, dtype=torch.float32, device=device), channel_scale)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Store x [n, heads, head_dim] at `slots`; returns the dequantized values (what a reader gets)."""
        c = self.channel_scale
        q, s = quantize_per_head(x if c is None else x / c.to(x.dtype))
        self.data.index_copy_(0, slots, q)
        self.scale.index_copy_(0, slots, s)
        return self._unscale(dequantize(q, s, x.dtype))

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[len(slots), heads, head_dim] dequantized."""
        return self._unscale(dequantize(self.data.index_select(0, slots), self.scale.index_select(0, slots), dtype))

    def _unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.channel_scale is None else x * self.channel_scale.to(x.dtype)


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=-1) / 127.0).clamp(min=1e-12).float()     # [n, heads]
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) * scale.unsqueeze(-1).to(dtype))


@torch.no_grad()
def key_channel_scale(w_k: torch.Tensor, b_k: torch.Tensor | None, norm_weight: torch.Tensor,
                      num_kv_heads: int, head_dim: int, strength: float = 0.5) -> torch.Tensor:
    """[num_kv_heads, head_dim] divisor for one layer's int8 keys (`Int8KV.channel_scale`), from the
    weights alone: w_k [num_kv_heads * head_dim, hidden] the K rows of the (dequantized) QKV weight,
    b_k their bias, norm_weight the RMSNorm weight before it. Channel c of k = W_k (g * n) + b_k, with n
    the RMS-normalized input (unit RMS), has magnitude about sqrt(b_c^2 + sum_j (W_cj g_j)^2); RoPE
    mixes channels i and i + D/2, so a pair shares the root of their summed squares; the divisor is
    that to the power `strength`."""
    w = w_k.float() * norm_weight.float()[None, :]
    sq = (w * w).sum(dim=1)
    if b_k is not None:
        sq = sq + b_k.float() ** 2
    sq = sq.view(num_kv_heads, head_dim)
    pair = (sq[:, :head_dim // 2] + sq[:, head_dim // 2:]).sqrt().clamp(min=1e-6)
    return torch.cat([pair, pair], dim=1) ** strength


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """K + V bytes of one token over all layers."""
    return 2 * num_layers * num_kv_heads * (head_dim + 4)


class Int8KVSdpaBackend(SdpaBackend):
    """The sdpa reference backend over an int8 cache (k_cache / v_cache are Int8KV): the same
    attention, with storage that quantizes on write and dequantizes on read. A fresh prefill attends
    to the dequantized values too, so it sees exactly what later decodes will."""

    def _write(self, cache: Int8KV, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return cache.write(slots, x)

    def _read(self, cache: Int8KV, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return cache.read(slots, dtype)
