"""The fused CPU kernels (kernels/csrc/cpu_ops.cpp) against the torch expressions they replace,
and the `cpu` attention backend against the `sdpa` reference on mixed decode + prefill steps, on every ISA
level the CPU has (the `isa` fixture, conftest.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleinfer.attention.metadata import build_metadata
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern
from scaleinfer.attention.sdpa import CpuPagedBackend, SdpaBackend
from scaleinfer.layers.activation import silu_and_mul
from scaleinfer.layers.fused import fused_ops
from scaleinfer.layers.norm import RMSNorm
from scaleinfer.layers.rotary import apply_rotary, apply_rotary_

ops = fused_ops(torch.zeros(1))
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels not built (no compiler)")


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(isa, with_residual):
    torch.manual_seed(0)
    x, res, w = torch.randn(5, 576), torch.randn(5, 576), torch.randn(576)
    want_stream = x + res if with_residual else x
    want = F.rms_norm(want_stream, (576,), w, 1e-5)
    r = res.clone() if with_residual else None
    out, stream = ops.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(stream, want_stream)
    if with_residual:
        assert stream.data_ptr() == r.data_ptr()  # the residual stream is updated in place
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.copy_(w)
    torch.testing.assert_close(norm(x, res.clone() if with_residual else None)[0], want, rtol=1e-5, atol=1e-5)


def test_rotary_in_place_on_fused_qkv_view():
    torch.manual_seed(1)
    n, h, hkv, d = 4, 9, 3, 64
    qkv = torch.randn(n, (h + 2 * hkv) * d)
    angles = torch.randn(n, 1, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    view = qkv[:, :(h + hkv) * d].view(n, h + hkv, d)
    want = apply_rotary(view.clone(), cos, sin)
    v_before = qkv[:, (h + hkv) * d:].clone()
    apply_rotary_(view, cos, sin)
    torch.testing.assert_close(view, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, (h + hkv) * d:], v_before)  # V untouched


def test_silu_and_mul(isa):
    gate_up = torch.randn(3, 2 * 1536)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_kv_write_and_bounds():
    k_cache, v_cache = torch.zeros(32, 3, 64), torch.zeros(32, 3, 64)
    qkv = torch.randn(2, 15 * 64)
    k = qkv[:, 9 * 64:12 * 64].view(2, 3, 64)   # strided rows, as the model passes them
    v = qkv[:, 12 * 64:].view(2, 3, 64)
    slots = torch.tensor([7, 30])
    ops.kv_write(k_cache, v_cache, slots, k, v)
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v)
    assert k_cache.abs().sum() == k.abs().sum()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.kv_write(k_cache, v_cache, torch.tensor([32, 0]), k, v)


@pytest.mark.parametrize("pattern", [CAUSAL, AttentionPattern.sliding_window(5),
                                     AttentionPattern.with_sinks(2, 6)], ids=str)
@pytest.mark.parametrize("d", [64, 128, 48])   # AVX-512 specializations for 64 and 128, the generic loop
def test_cpu_backend_equals_sdpa(isa, pattern, d):
    """Three decodes of different lengths (so masks/padding) and a chunked prefill, GQA 9/3."""
    torch.manual_seed(2)
    block, h, hkv = 4, 9, 3
    query_lens, context_lens = [1, 1, 1, 6], [3, 17, 9, 14]
    tables = [[0], [1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    results = []
    for backend in (SdpaBackend(), CpuPagedBackend()):
        torch.manual_seed(3)
        k_cache, v_cache = torch.randn(13 * block, hkv, d), torch.randn(13 * block, hkv, d)
        n = sum(query_lens)
        q, k, v = torch.randn(n, h, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        meta = build_metadata(query_lens, context_lens, tables, block, [pattern]).for_pattern(pattern)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, d ** -0.5)
        results.append((out, k_cache, v_cache))
    (ref, kc_ref, vc_ref), (got, kc, vc) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_paged_decode_attention_rejects_bad_lengths():
    k_cache = torch.randn(8, 1, 4)
    q, out = torch.randn(1, 2, 4), torch.empty(1, 2, 4)
    with pytest.raises(RuntimeError, match="keys for a table"):
        ops.paged_decode_attention(out, q, k_cache, k_cache, torch.zeros(1, 3, dtype=torch.long),
                                   torch.tensor([4]), 0.5)


@pytest.mark.parametrize("rows", [1, 2, 4, 7, 8, 13, 32])
@pytest.mark.parametrize("shape", [(64, 576), (37, 100), (3, 1536), (5, 200)])   # N % 4, K % 64 and K % 16 tails
@pytest.mark.parametrize("bias", [False, True])
def test_f32_linear_equals_f_linear(isa, rows, shape, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(*shape, generator=g)
    b = torch.randn(shape[0], generator=g) if bias else None
    x = torch.randn(rows, shape[1], generator=g)
    ref = F.linear(x, w, b)
    # fp32 sums of K products in another order (each ISA's vector width): 1e-6 of the output's scale
    torch.testing.assert_close(ops.f32_linear(x, w, b), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("shape", [(300, 512), (37, 100), (70, 1000)])
def test_f32_linear_rows_do_not_depend_on_the_batch(isa, shape):
    """Each input row's outputs are bit-identical whether it runs alone or among up to 32 rows (the AVX-512
    kernel blocks input rows by four and weight rows by two from 8 rows on: every pair's sums take the same
    order in any block)."""
    from scaleinfer.layers.linear import f32_kernel_max_rows

    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(*shape, generator=g)
    x = torch.randn(f32_kernel_max_rows(ops), shape[1], generator=g)
    alone = torch.cat([ops.f32_linear(x[i:i + 1], w, None) for i in range(x.shape[0])])
    for m in range(2, x.shape[0] + 1):
        assert torch.equal(ops.f32_linear(x[:m], w, None), alone[:m]), m


def test_dense_linear_takes_the_gemv_for_decode_rows_and_blas_beyond():
    from scaleinfer.layers.linear import Linear, f32_kernel_max_rows

    F32_KERNEL_MAX_ROWS = f32_kernel_max_rows(ops)   # 32 with AVX-512, else 4

    layer = Linear(96, 40, bias=True)
    layer.weight.data.copy_(torch.randn(40, 96))
    layer.bias.data.copy_(torch.randn(40))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.is_contiguous()                          # row-major for the kernel
    x = torch.randn(F32_KERNEL_MAX_ROWS + 3, 96)
    calls = []
    real = ops.f32_linear

    class Spy:
        def __getattr__(self, name):
            return getattr(ops, name)

        def f32_linear(self, *args):
            calls.append(args[0].shape[0])
            return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("scaleinfer.layers.linear._f32_ops", lambda w: Spy())
        small, big = layer(x[:F32_KERNEL_MAX_ROWS]), layer(x)
    assert calls == [F32_KERNEL_MAX_ROWS]
    ref = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(small, ref[:F32_KERNEL_MAX_ROWS], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big, ref, rtol=1e-5, atol=1e-5)
