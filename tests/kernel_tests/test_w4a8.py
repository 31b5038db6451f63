"""w4a8 (int4 group-32 weights x int8 activations per block of 32, integer dot products) and its LM head
(int8 weights per block of 32, Q8_0's layout, x the same activations) against their reference: the same
block-quantized activations times the dequantized weights in fp32, on every code path the CPU has
(ISA levels scalar, avx2 and avx512: AVX2 maddubs; avx512_vnni: 512-bit VNNI; the block-32 int8 kernel
has 512-bit VNNI and scalar).
The integer sums are exact; only the float scaling order differs (1e-5 of the output scale)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import W4A8, W4A8_MAX_ROWS, Int4WeightOnly, quantize_blocks
from scaleinfer.quantization.int8 import A8_BLOCK_MAX_ROWS, W8A8Block32, quantize_blocks32
from scaleinfer.kernels import cpu_kernels

ops = cpu_kernels()


def _layer(out_f: int, in_f: int, bias: bool) -> Linear:
    g = torch.Generator().manual_seed(0)
    layer = Linear(in_f, out_f, bias=bias)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g))
    return layer


# in_features of 3, 7, 8, 18, 23 and 48 groups exercise the 512-bit paths' last block of fewer than 16 groups
# (masked loads); 33, 37 and 70 output rows split unevenly over the threads.
@pytest.mark.parametrize("shape", [(64, 96), (40, 224), (96, 256), (33, 576), (37, 736), (70, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 5, W4A8_MAX_ROWS])
def test_w4a8_matches_its_reference(isa, shape, rows):
    if ops is None:
        pytest.skip("CPU kernels not built: w4a8 falls back to the int4 weight-only path")
    layer = _layer(*shape, bias=True)
    m = W4A8()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    x[0, :32] = 0.0                          # an all-zero block (scale 0)
    ref = m.reference(layer, x)
    y = layer(x)
    assert y.shape == (rows, shape[0])
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("shape", [(64, 96), (37, 736), (200, 576), (70, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 16, A8_BLOCK_MAX_ROWS])
def test_w8a8_block32_matches_its_reference(isa, shape, rows):
    if ops is None:
        pytest.skip("CPU kernels not built")
    layer = _layer(*shape, bias=True)
    m = W8A8Block32()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(3))
    x[0, 32:64] = 0.0                        # an all-zero activation block
    ref = m.reference(layer, x)
    y = layer(x)
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5
    more = torch.randn(A8_BLOCK_MAX_ROWS + 1, shape[1])  # past the GEMV's rows: the a8 GEMM, else slices + BLAS
    if ops.a8_gemm_path() != "none":
        ref = m.reference(layer, more)
        assert float((layer(more) - ref).abs().max() / ref.abs().max()) < 1e-5
    else:
        torch.testing.assert_close(layer(more), F.linear(more, m.dequantize(layer), layer.bias), rtol=1e-5, atol=1e-5)
