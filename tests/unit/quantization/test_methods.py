"""Every quantization method as a layer: close to fp32, packing and GGUF layouts, apply_quantization.
Each method against its own dequantized reference on every kernel code path: tests/kernel_tests/test_lowbit_linear.py.
"""
from __future__ import annotations

import pytest
import torch

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization import apply_quantization
from scaleinfer.quantization.int4 import Int4WeightOnly, dequantize_groupwise, pack_int4, quantize_groupwise, unpack_int4
from scaleinfer.quantization.int8 import W8A8, Int8WeightOnly


def _layer(out_f: int, in_f: int, bias: bool = False, seed: int = 0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(in_f, out_f, bias=bias)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g))
    return layer


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("method,tol", [(Int8WeightOnly, 0.01), (Int4WeightOnly, 0.15), (W8A8, 0.02)],
                         ids=["int8", "int4", "w8a8"])
def test_method_is_close_to_fp32(method, tol):
    layer = _layer(256, 512)
    w = layer.weight.detach().clone()
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(2))
    ref = x @ w.t()
    m = method()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    assert _rel_err(layer(x), ref) < tol
    assert _rel_err(layer(x[:1]), ref[:1]) < tol


def test_int4_packing_round_trip_and_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), q)
    # GGUF Q4 layout: byte i of a 32-chunk holds element i (low nibble) and element i + 16 (high)
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 16]) << 4


def test_int4_requantizes_q4_1_blocks_exactly():
    """A weight already on a Q4_1 grid (w = q * d + m per block of 32) comes back bit-for-bit."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (8, 128), generator=g)
    q[:, ::32] = 0
    q[:, 1::32] = 15                                              # every block spans the full range
    d = (torch.rand(8, 4, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(8, 4, generator=g) * 0.05).half().float()
    w = (q.view(8, 4, 32) * d[..., None] + m[..., None]).view(8, 128)
    packed, scale, mn = quantize_groupwise(w, 32)
    assert torch.equal(unpack_int4(packed).long(), q)
    assert torch.allclose(dequantize_groupwise(packed, scale, mn), w, rtol=0, atol=1e-6)


def test_int8_zero_rows_do_not_divide_by_zero():
    layer = _layer(32, 64)
    layer.weight.data[3] = 0
    m = Int8WeightOnly()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    y = layer(torch.randn(2, 64))
    assert torch.isfinite(y).all() and torch.all(y[:, 3] == 0)


def test_apply_quantization_swaps_every_linear_and_keeps_lm_head_at_int8():
    model = torch.nn.Module()
    model.proj = _layer(64, 64)
    model.lm_head = _layer(128, 64, seed=1)
    assert apply_quantization(model, "int4") == "int4"
    assert isinstance(model.proj.quant_method, Int4WeightOnly)
    assert isinstance(model.lm_head.quant_method, Int8WeightOnly)


def test_apply_quantization_rejects_unknown_modes():
    from scaleinfer.errors import ConfigError

    with pytest.raises(ConfigError, match="int3"):
        apply_quantization(torch.nn.Module(), "int3")


def test_int4_group_falls_back_to_one_that_divides_in_features():
    layer = _layer(32, 96)                        # 96 is not a multiple of 64
    m = Int4WeightOnly(group_size=64)
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    assert m.group_size == 32 and layer.weight_scale.shape == (32, 3)
    x = torch.randn(2, 96)
    torch.testing.assert_close(layer(x), x @ m.dequantize(layer).t(), atol=1e-5, rtol=1e-5)
