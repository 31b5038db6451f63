"""Causal self-attention over the paged cache with an additive per-head position bias (T5's relative
attention buckets): the reference path for models whose scores depend on (query position, key position)
beyond what a pattern or RoPE expresses. Writes the step's K/V at meta.slot_mapping, then reads every
request's keys through the same metadata the backends read (decode rows: decode_slots / decode_lens,
prefill chunks: kv_slots, or the chunk's own K/V when it is the whole context), keys in position order 0 .. context_len - 1.

    scores[h, q, k] = (q . k) * scale + bias(h, key_pos - query_pos),   key_pos <= query_pos
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from scaleinfer.attention.metadata import AttentionMetadata

BiasFn = Callable[[torch.Tensor], torch.Tensor]
"""relative positions [..., q, k] (key - query, int64) -> bias [..., heads, q, k]."""


def _write(cache, slots: torch.Tensor, x: torch.Tensor) -> None:
    if isinstance(cache, torch.Tensor):
        cache.index_copy_(0, slots, x.to(cache.dtype))
    else:   # attention/kv_int8.py Int8KV
        cache.write(slots, x)


def _read(cache, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:]).to(dtype)
    return cache.read(slots.reshape(-1), dtype).view(*slots.shape, *cache.data.shape[1:])


def biased_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple,
                           meta: AttentionMetadata, positions: torch.Tensor, scale: float,
                           bias: BiasFn) -> torch.Tensor:
    """q: [n, heads, hd]; k / v: [n, kv_heads, hd] (kv_heads == heads) -> [n, heads, hd]."""
    k_cache, v_cache = kv_cache
    _write(k_cache, meta.slot_mapping, k)
    _write(v_cache, meta.slot_mapping, v)
    out = torch.empty_like(q)
    d = meta.num_decode_tokens
    if d:
        keys = _read(k_cache, meta.decode_slots, q.dtype)        # [d, W, h, hd]
        vals = _read(v_cache, meta.decode_slots, q.dtype)
        width = keys.shape[1]
        key_pos = torch.arange(width, device=q.device)
        scores = torch.einsum("dhe,dwhe->dhw", q[:d].float(), keys.float()) * scale
        rel = key_pos.view(1, 1, width) - positions[:d].view(d, 1, 1)          # [d, 1, W]
        scores = scores + bias(rel).squeeze(-2).float()                       # [d, h, W]
        lens = meta.decode_lens if meta.decode_lens is not None else torch.full((d,), width, device=q.device)
        scores = scores.masked_fill(key_pos.view(1, 1, width) >= lens.view(d, 1, 1), float("-inf"))
        out[:d] = torch.einsum("dhw,dwhe->dhe", scores.softmax(-1), vals.float()).to(q.dtype)
    for p in meta.prefills:
        rows = slice(p.query_start, p.query_start + p.query_len)
        if p.kv_slots is None:   # a fresh prompt: its keys are this step's own
            keys, vals = k[rows].float(), v[rows].float()
        else:                    # a later chunk: the whole context through the block table
            keys = _read(k_cache, p.kv_slots, q.dtype).float()                 # [ctx, h, hd]
            vals = _read(v_cache, p.kv_slots, q.dtype).float()
        qpos = positions[rows]
        kpos = torch.arange(p.context_len, device=q.device)
        scores = torch.einsum("qhe,khe->hqk", q[rows].float(), keys) * scale
        rel = kpos.view(1, -1) - qpos.view(-1, 1)                              # [q, k]
        scores = (scores + bias(rel).float()).masked_fill(rel > 0, float("-inf"))
        out[rows] = torch.einsum("hqk,khe->qhe", scores.softmax(-1), vals).to(q.dtype)
    return out
