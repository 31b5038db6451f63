"""int8 KV cache: the backend equals the fp32 reference backend run on the dequantized K/V (1e-5), and
stays within a stated distance of exact attention (2% of the output scale, random K/V)."""
from __future__ import annotations

import random

import pytest
import torch

from scaleinfer.attention.metadata import build_metadata
from scaleinfer.attention.sdpa import SdpaBackend
from scaleinfer.quantization.kv_int8 import Int8KV, Int8KVSdpaBackend, bytes_per_token, dequantize, quantize_per_head


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    return dequantize(*quantize_per_head(x), x.dtype)


def _step(block_size: int, heads: int, kv_heads: int):
    """A step with two decodes, a fresh prompt and a later chunk; earlier tokens already cached."""
    torch.manual_seed(0)
    rng = random.Random(block_size + heads)
    head_dim, num_blocks = 32, 200
    free = list(range(num_blocks))
    rng.shuffle(free)
    plan = [(17, 1), (3, 1), (0, 23), (30, 9)]
    seqs, earlier = [], []
    for before, new in plan:
        total = before + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        q = torch.randn(total, heads, head_dim)
        k = torch.randn(total, kv_heads, head_dim)
        v = torch.randn(total, kv_heads, head_dim)
        for pos in range(before):
            earlier.append((table[pos // block_size] * block_size + pos % block_size, k[pos], v[pos]))
        seqs.append((before, new, table, q, k, v))
    meta = build_metadata([n for _, n, *_ in seqs], [b + n for b, n, *_ in seqs], [s[2] for s in seqs], block_size)
    step = [torch.cat([s[i][s[0]:] for s in seqs]) for i in (3, 4, 5)]
    return num_blocks * block_size, kv_heads, head_dim, earlier, meta, step


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
def test_int8_backend_matches_reference_on_dequantized_kv(block_size, heads, kv_heads):
    num_slots, kv_heads, head_dim, earlier, meta, (q, k, v) = _step(block_size, heads, kv_heads)
    k8, v8 = Int8KV.empty(num_slots, kv_heads, head_dim), Int8KV.empty(num_slots, kv_heads, head_dim)
    k32 = torch.zeros(num_slots, kv_heads, head_dim)
    v32 = torch.zeros(num_slots, kv_heads, head_dim)
    for slot, ks, vs in earlier:
        slots = torch.tensor([slot])
        k8.write(slots, ks[None])
        v8.write(slots, vs[None])
        k32[slot], v32[slot] = _fake_quant(ks[None])[0], _fake_quant(vs[None])[0]
    scale = 32 ** -0.5
    out = Int8KVSdpaBackend().forward(q, k, v, k8, v8, meta, scale)
    ref = SdpaBackend().forward(q, _fake_quant(k), _fake_quant(v), k32, v32, meta, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    exact_k = torch.zeros_like(k32)
    exact_v = torch.zeros_like(v32)
    for slot, ks, vs in earlier:
        exact_k[slot], exact_v[slot] = ks, vs
    exact = SdpaBackend().forward(q, k, v, exact_k, exact_v, meta, scale)
    assert float((out - exact).abs().max() / exact.abs().max()) < 0.02


def test_quantize_per_head_error_is_within_half_a_step():
    x = torch.randn(50, 4, 64)
    q, s = quantize_per_head(x)
    assert q.dtype == torch.int8 and s.shape == (50, 4)
    assert torch.all((dequantize(q, s, x.dtype) - x).abs() <= s.unsqueeze(-1) * 0.5 + 1e-7)


def test_int8_kv_takes_about_a_quarter_of_fp32():
    layers, kv_heads, head_dim = 30, 3, 64
    fp32 = 2 * layers * kv_heads * head_dim * 4
    assert bytes_per_token(layers, kv_heads, head_dim) / fp32 == pytest.approx(68 / 256)
