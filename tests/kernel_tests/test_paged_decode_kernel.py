"""The CPU decode attention (kernels/csrc/decode_attention*.cpp) and K/V write (cpu_ops.cpp) kernels on
every KV cache dtype (float32, float16, bfloat16, int8 with and without per-channel key scales), split and
unsplit, on each code path the CPU has (the AVX-512 and AVX2 paths for head_dim 64 / 128 / 256 in 32-key blocks
of 16- / 8-key score vectors, the portable one for the rest and below AVX2), against torch on the same values.

Tolerance: the kernel reads exactly the values the reference reads (f16 / bf16 widened, int8 times its
scales, as attention/kv_int8.py: Int8KV.read computes them), so only the fp32 arithmetic differs (online
softmax, split combine, summation order): 1e-5 absolute and relative. Writes are bit-identical to torch's
conversions (round to nearest even) and to Int8KV.write.
"""
from __future__ import annotations

import pytest
import torch

from scaleinfer.attention.metadata import build_metadata
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern
from scaleinfer.attention.sdpa import CpuPagedBackend, SdpaBackend, kernel_kv_args
from scaleinfer.layers.fused import fused_ops
from scaleinfer.attention.kv_int8 import Int8KV


ops = fused_ops(torch.zeros(1))
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels not built (no compiler)")

KV_DTYPES = ["float32", "float16", "bfloat16", "int8", "int8-chan"]


def _cache(kind: str, slots: int, hkv: int, d: int, seed: int):
    """(k_cache, v_cache) of `kind`, filled with random K/V through its own write ("int8-vchan": channel
    scales on both K and V)."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(slots, hkv, d, generator=g) * 2, torch.randn(slots, hkv, d, generator=g)
    every = torch.arange(slots)
    if kind.startswith("int8"):
        chan = (torch.rand(hkv, d, generator=g) + 0.5) if kind in ("int8-chan", "int8-vchan") else None
        vchan = (torch.rand(hkv, d, generator=g) + 0.5) if kind == "int8-vchan" else None
        kc, vc = Int8KV.empty(slots, hkv, d, channel_scale=chan), Int8KV.empty(slots, hkv, d, channel_scale=vchan)
        kc.write(every, k)
        vc.write(every, v)
        return kc, vc
    dtype = getattr(torch, kind)
    return k.to(dtype), v.to(dtype)


def _reference(q, k_cache, v_cache, slots, lens, scale):
    """Each decode row against its keys, read (widened / dequantized) by torch."""
    d, h, dim = q.shape
    out = torch.empty(d, h, dim)
    for b in range(d):
        idx = slots[b, :lens[b]]
        k, v = SdpaBackend()._read(k_cache, idx, torch.float32), SdpaBackend()._read(v_cache, idx, torch.float32)
        group = h // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,khd->hk", q[b], k) * scale, -1)
        out[b] = torch.einsum("hk,khd->hd", p, v)
    return out


@pytest.mark.parametrize("kind", KV_DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256, 40, 36])   # the AVX-512 / AVX2 paths' sizes, 8 | D (AVX2 rows), neither
@pytest.mark.parametrize("splits", [1, 3, 0])       # unsplit, three parts per sequence, chosen by the kernel
def test_decode_attention_on_every_kv_dtype(kind, d, splits, isa):
    torch.manual_seed(d + splits)
    h, hkv, num_slots = 9, 3, 1200
    lens = torch.tensor([1, 31, 32, 33, 97, 700])   # below / at / past the kernel's 32-key block, long
    width = int(lens.max())
    slots = torch.stack([torch.randperm(num_slots)[:width] for _ in lens])
    k_cache, v_cache = _cache(kind, num_slots, hkv, d, seed=d)
    q = torch.randn(len(lens), h, d)
    out = torch.full((len(lens), h, d), float("nan"))
    kv = kernel_kv_args(k_cache, v_cache)
    ops.paged_decode_attention(out, q, kv[0], kv[1], slots, lens, d ** -0.5, *kv[2:], splits=splits)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, slots, lens, d ** -0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KV_DTYPES + ["int8-vchan"])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 64), (6, 3, 128), (7, 1, 64), (8, 2, 256)])
def test_decode_attention_gqa_groups_and_block_edges(kind, heads, kv_heads, d, isa):
    """Group sizes 1, 2, 7, 4 (the AVX-512 path keeps one partial-sum vector per head and key), lengths on
    both sides of its 16-key score vectors and 32-key blocks, keys in whole 16-slot cache blocks (as the
    engine's tables give them) and scattered, split and not."""
    torch.manual_seed(heads * d)
    lens = torch.tensor([15, 16, 17, 48, 63, 65, 130])
    width, num_slots = int(lens.max()), 16 * 12
    blocks = torch.stack([torch.randperm(12)[:(width + 15) // 16] for _ in lens])
    slots = (blocks.unsqueeze(-1) * 16 + torch.arange(16)).view(len(lens), -1)[:, :width].contiguous()
    slots[1::2] = torch.stack([torch.randperm(num_slots)[:width] for _ in lens[1::2]])
    k_cache, v_cache = _cache(kind, num_slots, kv_heads, d, seed=heads)
    q = torch.randn(len(lens), heads, d)
    want = _reference(q, k_cache, v_cache, slots, lens, d ** -0.5)
    kv = kernel_kv_args(k_cache, v_cache)
    for splits in (1, 2, 0):
        out = torch.full((len(lens), heads, d), float("nan"))
        ops.paged_decode_attention(out, q, kv[0], kv[1], slots, lens, d ** -0.5, *kv[2:], splits=splits)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_large_scores_stay_finite(isa):
    """Scores far apart (a key 60x the others): the running max grows within and across blocks, the
    rescaled sums and outputs stay finite and equal to the reference."""
    torch.manual_seed(11)
    d, n = 64, 300
    k_cache, v_cache = torch.randn(n, 1, d), torch.randn(n, 1, d)
    k_cache[[5, 70, 250]] *= 60
    q, slots, lens = torch.randn(1, 2, d), torch.arange(n).view(1, -1), torch.tensor([n])
    out = torch.empty(1, 2, d)
    ops.paged_decode_attention(out, q, k_cache, v_cache, slots, lens, 1.0, splits=1)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, slots, lens, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_count_changes_only_rounding(splits):
    """One long sequence of a 1-KV-head model (the batch-1 case the split is for), any part count."""
    torch.manual_seed(5)
    k_cache, v_cache = _cache("float16", 5000, 1, 64, seed=1)
    q, lens, slots = torch.randn(1, 4, 64), torch.tensor([4099]), torch.randperm(5000)[:4099].view(1, -1)
    out = torch.empty(1, 4, 64)
    ops.paged_decode_attention(out, q, k_cache, v_cache, slots, lens, 0.125, splits=splits)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, slots, lens, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KV_DTYPES)
def test_kv_write_stores_what_torch_stores(kind, isa):
    torch.manual_seed(7)
    hkv, d, num_slots = 3, 64, 40
    qkv = torch.randn(5, (9 + 2 * hkv) * d) * 3
    k = qkv[:, 9 * d:(9 + hkv) * d].view(5, hkv, d)   # strided rows, as the model passes them
    v = qkv[:, (9 + hkv) * d:].view(5, hkv, d)
    slots = torch.tensor([3, 0, 39, 17, 18])
    if kind.startswith("int8"):
        chan = torch.rand(hkv, d) + 0.5 if kind == "int8-chan" else None
        want = Int8KV.empty(num_slots, hkv, d, channel_scale=chan), Int8KV.empty(num_slots, hkv, d)
        got = Int8KV.empty(num_slots, hkv, d, channel_scale=chan), Int8KV.empty(num_slots, hkv, d)
        for c in want + got:
            c.data.zero_()
            c.scale.zero_()
        want[0].write(slots, k)
        want[1].write(slots, v)
        kv = kernel_kv_args(*got)
        ops.kv_write(kv[0], kv[1], slots, k, v, *kv[2:])
        for w, g in zip(want, got):
            assert torch.equal(g.data, w.data) and torch.equal(g.scale, w.scale)
        return
    dtype = getattr(torch, kind)
    k_cache, v_cache = torch.zeros(num_slots, hkv, d, dtype=dtype), torch.zeros(num_slots, hkv, d, dtype=dtype)
    ops.kv_write(k_cache, v_cache, slots, k, v)
    assert torch.equal(k_cache[slots], k.to(dtype)) and torch.equal(v_cache[slots], v.to(dtype))
    assert int((k_cache != 0).any(-1).any(-1).sum()) == len(slots)


def test_kernels_refuse_an_int8_cache_without_scales():
    data = torch.zeros(8, 1, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="per-token scales"):
        ops.kv_write(data, data, torch.tensor([0]), torch.randn(1, 1, 16), torch.randn(1, 1, 16))
    with pytest.raises(RuntimeError, match="not float32, float16, bfloat16 or int8"):
        ops.kv_write(data.double(), data.double(), torch.tensor([0]), torch.randn(1, 1, 16), torch.randn(1, 1, 16))


@pytest.mark.parametrize("kind", KV_DTYPES)
@pytest.mark.parametrize("pattern", [CAUSAL, AttentionPattern.sliding_window(5), AttentionPattern.with_sinks(2, 6)],
                         ids=str)
def test_cpu_backend_equals_sdpa_on_every_kv_dtype(kind, pattern):
    """Three decodes of different lengths and a chunked prefill, GQA 9/3: the `cpu` backend (kernels) and
    the `sdpa` reference store the same K/V and compute the same attention on each cache dtype."""
    block, h, hkv, d = 4, 9, 3, 64
    query_lens, context_lens = [1, 1, 1, 6], [3, 17, 9, 14]
    tables = [[0], [1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    results = []
    for backend in (SdpaBackend(), CpuPagedBackend()):
        k_cache, v_cache = _cache(kind, 13 * block, hkv, d, seed=3)
        torch.manual_seed(4)
        n = sum(query_lens)
        q, k, v = torch.randn(n, h, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        meta = build_metadata(query_lens, context_lens, tables, block, [pattern]).for_pattern(pattern)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, d ** -0.5)
        results.append((out, kernel_kv_args(k_cache, v_cache)))
    (ref, kv_ref), (got, kv) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(kv, kv_ref):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("kind", ["float16", "int8-chan", "bfloat16", "float32"])
@pytest.mark.parametrize("heads,kv_heads,d", [(12, 2, 128), (9, 3, 64), (4, 2, 48)])
def test_prefetch_ahead_leaves_outputs_bit_identical(kind, heads, kv_heads, d, isa, monkeypatch):
    """The prefetch of the next blocks' K and V lines during each block's passes (kv::Ahead; the AVX-512 path
    and, for head sizes it does not cover, the portable one) only touches memory: outputs equal, bit for bit,
    those with it off (SI_ATTN_PREFETCH=0) or further ahead, split over threads or not."""
    torch.manual_seed(heads)
    lens = torch.tensor([17, 700, 2049])
    num_slots = 16 * 140
    slots = torch.stack([torch.randperm(num_slots)[:int(lens.max())] for _ in lens])
    k_cache, v_cache = _cache(kind, num_slots, kv_heads, d, seed=d)
    q = torch.randn(len(lens), heads, d)
    kv = kernel_kv_args(k_cache, v_cache)
    for splits in (1, 0):
        outs = []
        for ahead in ("0", "1", "3"):
            monkeypatch.setenv("SI_ATTN_PREFETCH", ahead)
            out = torch.full((len(lens), heads, d), float("nan"))
            ops.paged_decode_attention(out, q, kv[0], kv[1], slots, lens, d ** -0.5, *kv[2:], splits=splits)
            outs.append(out)
        assert not outs[0].isnan().any()
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("kind", ["float16", "int8-chan"])
def test_a_rows_output_does_not_depend_on_the_other_rows(kind, isa):
    """Batch invariance: a decode row's output is bit-identical alone and next to other rows (speculative
    verification runs k + 1 rows of one sequence, continuous batching mixes sequences), at lengths the
    kernel splits over threads. The split of a row's keys depends on its own length only (a split chosen
    from the whole step's keys once flipped greedy tokens with speculation on a 1,000-token prompt)."""
    torch.manual_seed(0)
    heads, kv_heads, d = 12, 2, 128
    lens = torch.tensor([900, 901, 902, 903, 904, 4096, 300, 40])
    num_slots = 16 * 260
    slots = torch.stack([torch.randperm(num_slots)[:int(lens.max())] for _ in lens])
    k_cache, v_cache = _cache(kind, num_slots, kv_heads, d, seed=1)
    q = torch.randn(len(lens), heads, d)
    kv = kernel_kv_args(k_cache, v_cache)
    together = torch.empty(len(lens), heads, d)
    ops.paged_decode_attention(together, q, kv[0], kv[1], slots, lens, d ** -0.5, *kv[2:])
    for b in range(len(lens)):
        alone = torch.empty(1, heads, d)
        ops.paged_decode_attention(alone, q[b:b + 1].clone(), kv[0], kv[1], slots[b:b + 1].clone(), lens[b:b + 1].clone(),
                                   d ** -0.5, *kv[2:])
        assert torch.equal(alone[0], together[b]), f"row {b} ({int(lens[b])} keys) differs alone"
