"""int8 KV cache: K and V stored as int8 with one fp32 scale per (token, KV head); an SDPA backend on it.

Per token and head, s = max|x| / 127 over head_dim and q = round(x / s): 1 byte per element plus
4 bytes per head-vector, i.e. (head_dim + 4) / (4 * head_dim) of fp32 (0.27x at head_dim 64) and
about half of fp16. Everything attention reads goes through the quantized copy, including a prompt's
own K/V in the step that writes them, so what a later decode step sees is what every query saw
(and perplexity measured in one prefill window shows the cost). Dequantized K/V then take the
reference SDPA path (attention/sdpa.py), the oracle this backend is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleinfer.attention.metadata import AttentionMetadata


@dataclass
class Int8KV:
    """One of K or V for one layer: data [num_slots, num_kv_heads, head_dim] int8, scale [num_slots, num_kv_heads]."""

    data: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def empty(cls, num_slots: int, num_kv_heads: int, head_dim: int, device="cpu") -> "Int8KV":
        return cls(torch.empty(num_slots, num_kv_heads, head_dim, dtype=torch.int8, device=device),
                   torch.empty(num_slots, num_kv_heads, dtype=torch.float32, device=device))

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Store x [n, heads, head_dim] at `slots`; returns the dequantized values (what a reader gets)."""
        q, s = quantize_per_head(x)
        self.data.index_copy_(0, slots, q)
        self.scale.index_copy_(0, slots, s)
        return dequantize(q, s, x.dtype)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[len(slots), heads, head_dim] dequantized."""
        return dequantize(self.data.index_select(0, slots), self.scale.index_select(0, slots), dtype)


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=-1) / 127.0).clamp(min=1e-12).float()     # [n, heads]
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) * scale.unsqueeze(-1).to(dtype))


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """K + V bytes of one token over all layers."""
    return 2 * num_layers * num_kv_heads * (head_dim + 4)


class Int8KVSdpaBackend:
    """The sdpa reference backend over an int8 cache (k_cache / v_cache are Int8KV)."""

    def forward(self, q, k, v, k_cache: Int8KV, v_cache: Int8KV, meta: AttentionMetadata, scale: float):
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        k_hat = k_cache.write(meta.slot_mapping, k)
        v_hat = v_cache.write(meta.slot_mapping, v)
        out = torch.empty_like(q)

        d = meta.num_decode_tokens
        if d:
            slots = meta.decode_slots
            max_ctx = slots.shape[1]
            # [d, max_ctx, kv_heads, head_dim] -> [d, kv_heads, max_ctx, head_dim]
            kd = k_cache.read(slots.view(-1), q.dtype).view(d, max_ctx, num_kv_heads, head_dim).transpose(1, 2)
            vd = v_cache.read(slots.view(-1), q.dtype).view(d, max_ctx, num_kv_heads, head_dim).transpose(1, 2)
            qd = q[:d].view(d, num_kv_heads, group, head_dim)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
            out[:d] = od.reshape(d, num_heads, head_dim)

        for seq in meta.prefills:
            s, n = seq.query_start, seq.query_len
            qs = q[s:s + n].transpose(0, 1).unsqueeze(0)              # [1, heads, n, head_dim]
            if seq.kv_slots is None:
                ks, vs = k_hat[s:s + n], v_hat[s:s + n]
                mask, causal = None, True
            else:
                ks, vs = k_cache.read(seq.kv_slots, q.dtype), v_cache.read(seq.kv_slots, q.dtype)
                mask, causal = seq.mask, False
            ks = ks.transpose(0, 1).unsqueeze(0)                      # [1, kv_heads, ctx, head_dim]
            vs = vs.transpose(0, 1).unsqueeze(0)
            os_ = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                                 enable_gqa=group > 1)
            out[s:s + n] = os_.squeeze(0).transpose(0, 1)
        return out
