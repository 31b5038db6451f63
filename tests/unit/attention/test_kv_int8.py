"""int8 KV cache: the backend equals the fp32 reference backend run on the dequantized K/V (1e-5), and
stays within a stated distance of exact attention (2% of the output scale, random K/V)."""
from __future__ import annotations

import random

import pytest
import torch

from scaleinfer.attention.metadata import build_metadata
from scaleinfer.attention.sdpa import SdpaBackend
from scaleinfer.attention.kv_int8 import (Int8KV, Int8KVSdpaBackend, bytes_per_token, dequantize, key_channel_scale,
                                         quantize_per_head)


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


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE by `angle` [head_dim / 2] (per channel pair)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


def test_key_channel_scales_even_out_outlier_channels_at_any_rotation():
    """Keys with a few large channel pairs (Qwen2's K bias) lose the small channels to the per-token
    scale; a pair-equal channel scale keeps them, before and after any RoPE rotation."""
    torch.manual_seed(0)
    heads, d, n = 2, 64, 200
    mag = torch.ones(heads, d)
    mag[:, [3, 3 + d // 2]] = 40.0                 # one outlier channel pair per head
    mag[:, [10, 10 + d // 2]] = 15.0
    k = torch.randn(n, heads, d) * mag
    c = mag.sqrt()                                 # strength 0.5, equal within each pair
    plain, smooth = Int8KV.empty(n, heads, d), Int8KV.empty(n, heads, d, channel_scale=c)
    slots = torch.arange(n)
    small = mag == 1.0
    for angle in (torch.zeros(d // 2), torch.rand(d // 2) * 6.28):
        x = _rotate(k, angle)
        err_plain = (plain.write(slots, x) - x).abs()[..., small[0]].mean()
        got = smooth.write(slots, x)
        assert torch.equal(got, smooth.read(slots, torch.float32))   # what is read is what was returned
        err_smooth = (got - x).abs()[..., small[0]].mean()
        assert err_smooth < err_plain / 2


def test_key_channel_scale_is_the_pair_magnitude_of_each_k_channel():
    """c = sqrt(b^2 + sum_j (W_cj g_j)^2), summed over the RoPE pair (c, c + D/2) before the root,
    to the power `strength`; checked channel by channel against that formula."""
    torch.manual_seed(0)
    heads, d, hidden = 2, 8, 16
    w, b, g = torch.randn(heads * d, hidden), torch.randn(heads * d), torch.rand(hidden) + 0.5
    b[3] = 50.0                                    # an outlier bias (Qwen2's K bias)
    c = key_channel_scale(w, b, g, heads, d, strength=0.5)
    assert c.shape == (heads, d)
    for head in range(heads):
        for i in range(d // 2):
            rows = [head * d + i, head * d + i + d // 2]
            mag = sum(float(((w[r] * g) ** 2).sum() + b[r] ** 2) for r in rows) ** 0.5
            assert float(c[head, i]) == pytest.approx(mag ** 0.5, rel=1e-5)
            assert float(c[head, i + d // 2]) == float(c[head, i])
    assert float(c[0, 3]) > 2 * float(c[0, 0])             # the outlier pair gets the larger divisor
    assert torch.equal(key_channel_scale(w, None, g, heads, d, strength=1.0),
                       key_channel_scale(w, torch.zeros(heads * d), g, heads, d, strength=1.0))
