"""Every quantization method against its own dequantized reference, on every kernel code path the CPU has.

Tolerances: the weight-only kernels widen the packed weights to fp32 and use FMA, so they match
x @ dequantize(W)^T to fp32 rounding (max error <= 1e-4 relative to the output's scale). W8A8 also
rounds activations per token; it is checked against quantized-activation x dequantized-weight math
in fp32 (same integers, so only the int32 -> fp32 scaling differs: 1e-4), and against the plain
fp32 product within 2% of the output scale.
"""
from __future__ import annotations

import pytest
import torch

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization import apply_quantization
from scaleinfer.quantization.int4 import Int4WeightOnly, dequantize_groupwise, pack_int4, quantize_groupwise, unpack_int4
from scaleinfer.quantization.int8 import W8A8, Int8WeightOnly
from scaleinfer.quantization.kernels import lowbit_ops

from .kernel_paths import forced_path

SHAPES = [(96, 64), (160, 128), (64, 256)]          # (out, in), in a multiple of 64 for all groups
ROWS = [1, 3, 4, 5, 9, 40, 64, 200]                  # M = 1 kernel, 2x4-tile kernel, slices + BLAS


def _isas() -> list[str]:
    ops = lowbit_ops()
    if ops is None:
        return ["torch"]
    best = ops.isa()
    return ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(best) + 1]


@pytest.fixture(params=_isas())
def isa(request):
    with forced_path("set_isa", request.param) as name:
        yield name


def _layer(out_f: int, in_f: int, bias: bool = False, seed: int = 0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(in_f, out_f, bias=bias)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g))
    return layer


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("method", [Int8WeightOnly, Int4WeightOnly, lambda: Int4WeightOnly(64), W8A8],
                         ids=["int8", "int4-g32", "int4-g64", "w8a8"])
def test_method_matches_dequantized_reference(isa, shape, rows, method):
    layer = _layer(*shape, bias=True)
    m = method()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    assert layer.weight is None  # the dense copy is gone
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    y = layer(x)
    if isinstance(m, W8A8) and rows >= 16:
        ref = m.reference(layer, x)
    else:
        ref = torch.nn.functional.linear(x, m.dequantize(layer), layer.bias)
    assert y.shape == (rows, shape[0])
    assert _rel_err(y, ref) < 1e-4


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


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("shape", [(1536, 576), (33, 100)], ids=["smollm2-gate-up", "odd-out-ragged-in"])
def test_int8_many_rows_match_dequantized_reference(isa, shape, rows):
    """The M > 1 kernel (2x4 register tiles) on a real layer width and on an odd output count with an
    input width that is no multiple of the vector length (tail loops, the last single-row pair)."""
    layer = _layer(*shape, bias=True)
    m = Int8WeightOnly()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(4))
    ref = torch.nn.functional.linear(x, m.dequantize(layer), layer.bias)
    assert _rel_err(layer(x), ref) < 1e-4
