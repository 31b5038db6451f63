"""Batch invariance of the w4a8 decode kernels: an input row's outputs are bit-identical whether it runs
alone or with other rows (speculative verification runs k + 1 draft rows, continuous batching mixes
requests; greedy outputs must not depend on either). Checked on every ISA level this CPU has, for every
row count up to W4A8_MAX_ROWS (the multi-row GEMVs of csrc/int4_a8.cpp and int8_a8.cpp take input rows in
passes of up to 8, each row count its own instance), for block-32 int8 weights (the LM head; auto's 6- and 8-bit GGUF
tensors) up to the rows their GEMV takes, and for per-channel int8 (W8A8: the weight-only kernel below 16
rows) up to 15 rows."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import W4A8, W4A8_MAX_ROWS
from scaleinfer.quantization.int8 import A8_BLOCK_GEMV_ROWS, A8_BLOCK_MAX_ROWS, W8A8, W8A8_MIN_ROWS, W8A8Block32
from scaleinfer.kernels import cpu_kernels

ops = cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels not built")


def _layer(method, out_f: int, in_f: int) -> Linear:
    g = torch.Generator().manual_seed(0)
    layer = Linear(in_f, out_f, bias=True)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    layer.bias.data.copy_(torch.randn(out_f, generator=g))
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    return layer


def _rows(n: int, k: int) -> torch.Tensor:
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    x[:, :k // 2] *= torch.rand(n, 1, generator=torch.Generator().manual_seed(7)) * 100  # rows of unlike scales
    x[0, :32] = 0.0  # an all-zero block
    return x


def _assert_each_row_alone(layer: Linear, x: torch.Tensor) -> None:
    together = layer(x)
    alone = torch.cat([layer(x[i:i + 1].clone()) for i in range(x.shape[0])])
    bad = [i for i in range(x.shape[0]) if not torch.equal(together[i], alone[i])]
    assert not bad, f"rows {bad} of {x.shape[0]} differ from the row alone (max {(together - alone).abs().max()})"


# 3, 7 and 23 groups: a last block of fewer than 16 groups (masked loads, odd and even); 37 and 70 outputs: weight rows
# left over from blocks of 2 and 4 (and 37 > 32: two parallel chunks).
@pytest.mark.parametrize("shape", [(64, 96), (37, 736), (70, 1536)])
def test_w4a8_rows_equal_each_row_alone(isa, shape):
    layer = _layer(W4A8(), *shape)
    for m in list(range(2, 12)) + [15, W4A8_MAX_ROWS]:
        _assert_each_row_alone(layer, _rows(m, shape[1]))


def test_w4a8_kernel_rows_equal_each_row_alone_without_bias(isa):
    layer = _layer(W4A8(), 130, 1024)
    x = _rows(13, 1024)
    q, s, mn = layer.qweight, layer.weight_scale, layer.weight_min
    together = ops.int4_a8_linear(x, q, s, mn)
    for i in range(x.shape[0]):
        assert torch.equal(together[i:i + 1], ops.int4_a8_linear(x[i:i + 1].clone(), q, s, mn)), i


@pytest.mark.parametrize("shape", [(64, 96), (200, 576)])
def test_w8a8_block32_rows_equal_each_row_alone(isa, shape):
    layer = _layer(W8A8Block32(), *shape)
    gemv_rows = A8_BLOCK_GEMV_ROWS if ops.a8_gemm_path() != "none" else A8_BLOCK_MAX_ROWS   # the GEMM beyond
    for m in (2, 3, 5, 7, 9, gemv_rows):
        _assert_each_row_alone(layer, _rows(m, shape[1]))


# 8960 inputs: Qwen2.5-1.5B's down projection (a block of weight rows is ~64 KiB, 7 rows; odd K tail: 1000).
@pytest.mark.parametrize("shape", [(64, 96), (37, 1000), (50, 8960)])
def test_w8a8_decode_rows_equal_each_row_alone(isa, shape):
    layer = _layer(W8A8(), *shape)
    for m in (2, 3, 5, 8, W8A8_MIN_ROWS - 1):
        _assert_each_row_alone(layer, _rows(m, shape[1]))


def test_zero_input_rows_give_an_empty_output(isa):
    """A step can hand a linear no rows (e.g. the LM head when no row samples); the multi-row GEMVs then
    return [0, N] (they once divided by the number of passes, zero here, and the process died of SIGFPE)."""
    for method, shape in ((W4A8(), (70, 1536)), (W8A8Block32(), (64, 96))):
        layer = _layer(method, *shape)
        y = layer(torch.zeros(0, shape[1]))
        assert y.shape == (0, shape[0])
