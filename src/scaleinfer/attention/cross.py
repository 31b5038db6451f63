"""Cross-attention over the paged cache: the metadata decoder queries read their request's encoder K/V
through, storing that K/V once, and the module encoder-decoder models call.

Layout (models/encoder_decoder.py): a decoder layer's cross K/V live in the same flat (K, V) slot arrays
as its self-attention K/V, in the request's cross blocks. Cross-attention writes nothing during decoding:
`build_cross_metadata` gives an empty slot_mapping, every decode row reads all of its request's encoder
slots (no mask: attention over the encoder states is bidirectional), and every prefill chunk (a decoder
prompt of several tokens) reads them through kv_slots with no mask.

    cross_meta.decode_slots[i] = slots of encoder positions 0 .. num_encoder_tokens(i) - 1 of request i
"""
from __future__ import annotations

import torch
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.metadata import AttentionMetadata, PrefillSeq


def cross_slots(cross_block_ids: list[int], num_encoder_tokens: int, block_size: int) -> torch.Tensor:
    """[num_encoder_tokens] int64: the cache slot of each encoder position of one request."""
    pos = torch.arange(num_encoder_tokens, dtype=torch.long)
    return torch.tensor(cross_block_ids, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def build_cross_metadata(query_lens: list[int], encoder_lens: list[int], cross_tables: list[list[int]],
                         block_size: int) -> AttentionMetadata:
    """Cross-attention metadata of a step whose requests (decodes first, as build_metadata orders them)
    have these decoder query lengths, encoder lengths and cross block tables."""
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long))
    d = 0
    while d < len(query_lens) and query_lens[d] == 1:
        d += 1
    meta.num_decode_tokens = d
    slots = [cross_slots(t, n, block_size) for t, n in zip(cross_tables, encoder_lens)]
    if d:
        width = max(encoder_lens[:d])
        meta.decode_slots = torch.stack([torch.cat([s, s[:1].expand(width - len(s))]) for s in slots[:d]])
        lens = torch.tensor(encoder_lens[:d], dtype=torch.long)
        meta.decode_lens = lens
        if bool((lens < width).any()):
            meta.decode_mask = (torch.arange(width) < lens.unsqueeze(1)).view(d, 1, 1, width)
    start = d
    for qlen, n, s in zip(query_lens[d:], encoder_lens[d:], slots[d:]):
        meta.prefills.append(PrefillSeq(query_start=start, query_len=qlen, context_len=n, kv_slots=s, mask=None))
        start += qlen
    return meta


def store_cross_kv(kv_caches: list[tuple], cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
                   slots: torch.Tensor) -> None:
    """Write each decoder layer's cross (K, V) [n, kv_heads, head_dim] at `slots` [n] of its cache,
    converted to the cache's storage (a float tensor of any dtype, or attention/kv_int8.py's Int8KV)."""
    for (k_cache, v_cache), (k, v) in zip(kv_caches, cross_kv, strict=True):
        for cache, x in ((k_cache, k), (v_cache, v)):
            if isinstance(cache, torch.Tensor):
                cache.index_copy_(0, slots, x.to(cache.dtype))
            else:
                cache.write(slots, x)


class CrossAttention(nn.Module):
    """Decoder queries against their request's encoder K/V in the paged cache (non-causal, nothing written).

    Not an attention/layer.py Attention on purpose: it has no pattern (the KV policy of windows and sinks
    is about self-attention) and never writes the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.backend = backend

    def forward(self, q: torch.Tensor, kv_cache: tuple, cross_meta: AttentionMetadata) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]."""
        none = q.new_empty((0, self.num_kv_heads, self.head_dim))
        return self.backend.forward(q, none, none, kv_cache[0], kv_cache[1], cross_meta, self.scale)
