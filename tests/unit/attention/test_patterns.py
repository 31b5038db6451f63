"""Attention patterns: the fast paths (key gathering per tile / per decode, freed KV blocks) equal the
dense-mask oracle `AttentionPattern.allows` on random inputs."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from scaleinfer.attention.metadata import PREFILL_TILE, build_metadata
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern, parse_pattern, union_live_ranges
from scaleinfer.attention.sdpa import SdpaBackend
from scaleinfer.errors import ConfigError
from scaleinfer.attention.kv_int8 import Int8KVSdpaBackend

PATTERNS = [
    CAUSAL,
    AttentionPattern.sliding_window(7),
    AttentionPattern.sliding_window(1),
    AttentionPattern.with_sinks(3, 10),
    AttentionPattern.local_global(6, [(0, 5), (40, 43)]),
    AttentionPattern.block_sparse(4, 2, 3),
]


def covered(ranges) -> set[int]:
    return {p for s, e in ranges for p in range(s, e)}


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_key_ranges_are_exactly_the_attended_keys(pattern):
    rng = random.Random(0)
    for _ in range(200):
        q_lo = rng.randrange(0, 120)
        q_hi = q_lo + rng.randrange(1, 40)
        q = torch.arange(q_lo, q_hi).unsqueeze(1)
        k = torch.arange(0, q_hi).unsqueeze(0)
        dense = set(torch.nonzero(pattern.allows(q, k).any(0)).flatten().tolist())
        ranges = pattern.key_ranges(q_lo, q_hi)
        assert ranges == sorted(ranges) and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
        assert covered(ranges) == dense, (q_lo, q_hi)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_live_ranges_keep_every_key_a_future_query_attends(pattern):
    horizon = 200
    for q_next in range(0, 120, 7):
        q = torch.arange(q_next, q_next + horizon).unsqueeze(1)
        k = torch.arange(0, q_next).unsqueeze(0)
        needed = set(torch.nonzero(pattern.allows(q, k).any(0)).flatten().tolist())
        assert covered(pattern.live_ranges(q_next)) == needed, q_next


def test_union_of_layers_is_causal_when_any_layer_is():
    assert union_live_ranges([AttentionPattern.sliding_window(4), CAUSAL], 50) == [(0, 50)]
    assert union_live_ranges([AttentionPattern.sliding_window(4), AttentionPattern.with_sinks(2, 3)], 50) == \
        [(0, 2), (47, 50)]


@pytest.mark.parametrize("text,expected", [
    ("causal", CAUSAL),
    ("window=512", AttentionPattern.sliding_window(512)),
    ("sinks=4, window=1020", AttentionPattern.with_sinks(4, 1020)),
    ("window=256,global=0:64+100:110", AttentionPattern.local_global(256, [(0, 64), (100, 110)])),
    ("block=64,local=4,stride=8", AttentionPattern.block_sparse(64, 4, 8)),
])
def test_parse_pattern_round_trip(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(str(expected)) == expected


@pytest.mark.parametrize("text,message", [
    ("window", "not key=value"),
    ("window=abc", "not an integer"),
    ("sinks=4", "needs a window"),
    ("window=0", ">= 1"),
    ("windw=4", "unknown attention pattern key"),
    ("block=64,local=4", "needs stride"),
    ("window=8,global=5:2", "start:end"),
    ("block=8,local=1,stride=2,window=4", "cannot be combined"),
])
def test_bad_patterns_give_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_pattern(text)
    assert "\n" not in str(info.value)


def dense_reference(q, k, v, pattern, scale):
    """Attention of one whole sequence with the oracle mask: q [n, H, D], k/v [n, Hkv, D]."""
    n, group = q.shape[0], q.shape[1] // k.shape[1]
    pos = torch.arange(n)
    mask = pattern.allows(pos.unsqueeze(1), pos.unsqueeze(0))
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("backend_cls,atol", [(SdpaBackend, 1e-5), (Int8KVSdpaBackend, 0.05)])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_paged_step_with_pattern_matches_dense_mask(pattern, backend_cls, atol):
    """Decodes, a fresh prompt longer than a tile and a later chunk, blocks scattered at random, two
    patterns in one step (as in Gemma 3's local and global layers)."""
    torch.manual_seed(1)
    rng = random.Random(2)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    scale = head_dim ** -0.5
    num_blocks = 600
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
    if backend_cls is Int8KVSdpaBackend:
        from scaleinfer.attention.kv_int8 import Int8KV
        k_cache, v_cache = Int8KV.empty(num_blocks * block_size, kv_heads, head_dim), \
            Int8KV.empty(num_blocks * block_size, kv_heads, head_dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    plan = [(57, 1), (3, 1), (130, 1), (0, PREFILL_TILE + 37), (45, 30)]
    seqs = []
    for before, new in plan:
        total = before + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        q, k, v = torch.randn(total, heads, head_dim), torch.randn(total, kv_heads, head_dim), \
            torch.randn(total, kv_heads, head_dim)
        seqs.append((before, new, table, q, k, v))
    # earlier steps wrote the cached part through the backend itself (so int8 storage is exercised)
    pre = [(b, t, k[:b], v[:b]) for b, _, t, _, k, v in seqs if b]
    meta0 = build_metadata([b for b, *_ in pre], [b for b, *_ in pre], [t for _, t, *_ in pre], block_size)
    backend = backend_cls()
    backend.forward(torch.cat([k.repeat_interleave(2, 1) for *_, k, _ in pre]), torch.cat([k for *_, k, _ in pre]),
                    torch.cat([v for *_, v in pre]), k_cache, v_cache, meta0, scale)

    other = AttentionPattern.sliding_window(5)
    meta = build_metadata([n for _, n, *_ in seqs], [b + n for b, n, *_ in seqs], [s[2] for s in seqs], block_size,
                          [pattern, other])
    q_step = torch.cat([q[b:] for b, _, _, q, _, _ in seqs])
    k_step = torch.cat([k[b:] for b, _, _, _, k, _ in seqs])
    v_step = torch.cat([v[b:] for b, _, _, _, _, v in seqs])
    out = backend.forward(q_step, k_step, v_step, k_cache, v_cache, meta.for_pattern(pattern), scale)
    start = 0
    for before, new, _, q, k, v in seqs:
        ref = dense_reference(q, k, v, pattern, scale)[before:]
        torch.testing.assert_close(out[start:start + new], ref, atol=atol, rtol=atol)
        start += new


# ---- StreamingLLM positions within the cache (positions=cache) ---------------------------------------
def rope_rotate(x, pos, inv_freq):
    from scaleinfer.attention.sdpa import rotate

    return rotate(x, pos, inv_freq)


def shifted_oracle(q_raw, k_raw, v, pattern, scale, inv_freq):
    """Row by row: every key is rotated to the position it has in StreamingLLM's cache as that query
    sees it (sinks moved next to the window), then plain softmax attention over the allowed keys."""
    n, heads, _ = q_raw.shape
    group = heads // k_raw.shape[1]
    out = torch.empty_like(q_raw)
    pos = torch.arange(n)
    for qp in range(n):
        allowed = pattern.allows(torch.tensor(qp), pos[:qp + 1])
        k_pos = pos[:qp + 1] + torch.where(pos[:qp + 1] < pattern.sinks, pattern.sink_shift(qp), 0)
        kq = rope_rotate(k_raw[:qp + 1], k_pos.view(-1, 1), inv_freq).repeat_interleave(group, 1)
        qq = rope_rotate(q_raw[qp], torch.tensor(qp).view(1), inv_freq)            # [H, D]
        scores = torch.einsum("hd,khd->hk", qq, kq) * scale
        scores[:, ~allowed] = float("-inf")
        out[qp] = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v[:qp + 1].repeat_interleave(group, 1))
    return out


@pytest.mark.parametrize("backend_cls,atol", [(SdpaBackend, 1e-4), (Int8KVSdpaBackend, 0.05)])
def test_cache_positions_match_streaming_llm_oracle(backend_cls, atol):
    torch.manual_seed(3)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    scale, inv_freq = head_dim ** -0.5, 1.0 / (10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    pattern = parse_pattern("sinks=3,window=20,positions=cache")
    assert pattern.distance_bounded and not parse_pattern("sinks=3,window=20").distance_bounded
    total = 300
    q_raw, k_raw = torch.randn(total, heads, head_dim), torch.randn(total, kv_heads, head_dim)
    v = torch.randn(total, kv_heads, head_dim)
    pos = torch.arange(total).view(-1, 1)
    q, k = rope_rotate(q_raw, pos, inv_freq), rope_rotate(k_raw, pos, inv_freq)  # what the model computes
    ref = shifted_oracle(q_raw, k_raw, v, pattern, scale, inv_freq)

    num_blocks = 200
    if backend_cls is Int8KVSdpaBackend:
        from scaleinfer.attention.kv_int8 import Int8KV
        k_cache, v_cache = Int8KV.empty(num_blocks * block_size, kv_heads, head_dim), \
            Int8KV.empty(num_blocks * block_size, kv_heads, head_dim)
    else:
        k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
        v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim)
    table = list(range(num_blocks - 1, num_blocks - 1 - total // block_size, -1))
    backend, outs = backend_cls(), []
    # a 270-token prompt in chunks of 100, then 30 decodes: tiles with and without shifted rows
    steps = [(0, 100), (100, 100), (200, 70)] + [(p, 1) for p in range(270, 300)]
    for start, n in steps:
        meta = build_metadata([n], [start + n], [table], block_size, [pattern]).for_pattern(pattern)
        outs.append(backend.forward(q[start:start + n], k[start:start + n], v[start:start + n], k_cache, v_cache,
                                    meta, scale, rope=inv_freq))
    torch.testing.assert_close(torch.cat(outs), ref, atol=atol, rtol=atol)
    # the shift matters: with text positions the result is different
    plain = dense_reference(q, k, v, parse_pattern("sinks=3,window=20"), scale)
    assert (plain[100:] - ref[100:]).abs().max() > 1e-2
