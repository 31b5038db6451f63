"""The low-bit linear kernels (csrc/lowbit_linear.cpp) through every quantization method, against the
method's own dequantized reference, on every kernel code path the CPU has.

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
from scaleinfer.quantization.int4 import Int4WeightOnly
from scaleinfer.quantization.int8 import W8A8, Int8WeightOnly

SHAPES = [(96, 64), (160, 128), (64, 256)]          # (out, in), in a multiple of 64 for all groups
ROWS = [1, 3, 4, 5, 9, 40, 64, 200]                  # M = 1 kernel, 2x4-tile kernel, slices + BLAS


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
