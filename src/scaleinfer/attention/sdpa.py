"""Reference attention backend on torch's scaled_dot_product_attention (CPU or GPU).

Decodes are batched into one SDPA call over K/V gathered through the block tables; grouped-query
attention is handled without copying K/V by folding each KV head's query group into the query
axis. Prefill chunks run one by one: a chunk with no cached context attends to its own K/V with
`is_causal`, a later chunk reads its whole context from the cache with an offset causal mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleinfer.attention.metadata import AttentionMetadata


class SdpaBackend:
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)

        d = meta.num_decode_tokens
        if d:
            slots = meta.decode_slots
            max_ctx = slots.shape[1]
            # [d, max_ctx, kv_heads, head_dim] -> [d, kv_heads, max_ctx, head_dim]
            kd = k_cache.index_select(0, slots.view(-1)).view(d, max_ctx, num_kv_heads, head_dim).transpose(1, 2)
            vd = v_cache.index_select(0, slots.view(-1)).view(d, max_ctx, num_kv_heads, head_dim).transpose(1, 2)
            qd = q[:d].view(d, num_kv_heads, group, head_dim)  # query group folded into the query axis
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
            out[:d] = od.reshape(d, num_heads, head_dim)

        for seq in meta.prefills:
            s, n = seq.query_start, seq.query_len
            qs = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            if seq.kv_slots is None:
                ks, vs = k[s:s + n], v[s:s + n]
                mask, causal = None, True
            else:
                ks, vs = k_cache.index_select(0, seq.kv_slots), v_cache.index_select(0, seq.kv_slots)
                mask, causal = seq.mask, False
            ks = ks.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, head_dim]
            vs = vs.transpose(0, 1).unsqueeze(0)
            os_ = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=group > 1
            )
            out[s:s + n] = os_.squeeze(0).transpose(0, 1)
        return out
