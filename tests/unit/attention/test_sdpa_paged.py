"""Paged attention (K/V read through block tables) equals contiguous causal attention."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from scaleinfer.attention.metadata import build_metadata
from scaleinfer.attention.sdpa import SdpaBackend


def contiguous_reference(q, k, v, scale):
    """Plain causal attention over one whole sequence: q [n, H, D], k/v [n, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_mixed_step_matches_contiguous(block_size, heads, kv_heads):
    """A step with decodes, a fresh prefill and a later prefill chunk, blocks scattered at random."""
    torch.manual_seed(0)
    rng = random.Random(block_size * 100 + heads)
    head_dim, scale = 32, 32 ** -0.5
    num_blocks = 200
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)  # garbage in unused slots
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
    free = list(range(num_blocks))
    rng.shuffle(free)

    # (context before this step, tokens this step): two decodes, a fresh prompt, a second chunk.
    plan = [(17, 1), (3, 1), (0, 23), (30, 9)]
    seqs = []
    for before, new in plan:
        total = before + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        q = torch.randn(total, heads, head_dim)
        k = torch.randn(total, kv_heads, head_dim)
        v = torch.randn(total, kv_heads, head_dim)
        for pos in range(before):  # earlier steps already wrote these
            slot = table[pos // block_size] * block_size + pos % block_size
            k_cache[slot], v_cache[slot] = k[pos], v[pos]
        seqs.append((before, new, table, q, k, v))

    meta = build_metadata([n for _, n, *_ in seqs], [b + n for b, n, *_ in seqs], [s[2] for s in seqs], block_size)
    q_step = torch.cat([q[b:] for b, _, _, q, _, _ in seqs])
    k_step = torch.cat([k[b:] for b, _, _, _, k, _ in seqs])
    v_step = torch.cat([v[b:] for b, _, _, _, _, v in seqs])
    out = SdpaBackend().forward(q_step, k_step, v_step, k_cache, v_cache, meta, scale)

    start = 0
    for before, new, _, q, k, v in seqs:
        ref = contiguous_reference(q, k, v, scale)[before:]
        torch.testing.assert_close(out[start:start + new], ref, atol=1e-5, rtol=1e-5)
        start += new


def test_padded_decode_slots_never_read_nan():
    """Unwritten cache memory may hold NaN; padding of shorter decodes must not touch it."""
    block_size, heads, head_dim = 4, 2, 8
    k_cache = torch.full((40, heads, head_dim), float("nan"))
    v_cache = torch.full((40, heads, head_dim), float("nan"))
    meta = build_metadata([1, 1], [9, 2], [[0, 1, 2], [5]], block_size)
    k_cache[:12].normal_()
    v_cache[:12].normal_()
    k_cache[20:22].normal_()
    v_cache[20:22].normal_()
    q = torch.randn(2, heads, head_dim)
    kv = torch.randn(2, heads, head_dim)
    out = SdpaBackend().forward(q, kv, kv, k_cache, v_cache, meta, 1.0)
    assert torch.isfinite(out).all()
