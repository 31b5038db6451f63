"""w4a8 (int4 group-32 weights x int8 activations per block of 32, integer dot products) and its LM head
(int8 weights per block of 32, Q8_0's layout, x the same activations) against their reference: the same
block-quantized activations times the dequantized weights in fp32, on every code path the CPU has
(scalar, AVX2 maddubs, AVX512-VNNI 256- and 512-bit; the block-32 int8 kernel has 512-bit and scalar).
The integer sums are exact; only the float scaling order differs (1e-5 of the output scale)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import W4A8, W4A8_MAX_ROWS, Int4WeightOnly, quantize_blocks
from scaleinfer.quantization.int8 import A8_BLOCK_MAX_ROWS, W8A8Block32, quantize_blocks32
from scaleinfer.quantization.kernels import lowbit_ops

from .kernel_paths import forced_path

ops = lowbit_ops()
PATHS = ["scalar", "avx2", "avx512vnni", "avx512vnni-512"]


def _paths() -> list[str]:
    if ops is None:
        return ["torch"]
    out = []
    for p in PATHS:
        try:
            prev = ops.set_a8_path(p)
            ops.set_a8_path(prev)
            out.append(p)
        except RuntimeError:
            pass
    return out


@pytest.fixture(params=_paths())
def path(request):
    with forced_path("set_a8_path", request.param) as name:
        yield name


def _layer(out_f: int, in_f: int, bias: bool) -> Linear:
    g = torch.Generator().manual_seed(0)
    layer = Linear(in_f, out_f, bias=bias)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g))
    return layer


# in_features with an odd number of groups (3, 7, 23) exercise the 512-bit path's odd last group, 18 and 23
# groups its masked 16-group tail, 33, 37 and 70 rows the rows left over from blocks of four.
@pytest.mark.parametrize("shape", [(64, 96), (40, 224), (96, 256), (33, 576), (37, 736), (70, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 5, W4A8_MAX_ROWS])
def test_w4a8_matches_its_reference(path, shape, rows):
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


def test_w4a8_is_close_to_weight_only_int4():
    """int8 activations per block of 32 cost ~1% against fp32 activations on the same int4 weights, at
    decode (1 row) and prefill sizes (the GEMM, or the weight-only path itself: test_a8_gemm.py)."""
    layer = _layer(128, 512, bias=False)
    m = W4A8()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    assert layer.weight_scale.dtype == torch.float16 and layer.weight_min.dtype == torch.float16
    x = torch.randn(W4A8_MAX_ROWS + 1, 512, generator=torch.Generator().manual_seed(2))
    wo_layer = _layer(128, 512, bias=False)
    wo_layer.quant_method = Int4WeightOnly()
    wo_layer.weight = None
    wo_layer.register_buffer("qweight", layer.qweight)
    wo_layer.register_buffer("weight_scale", layer.weight_scale.float())
    wo_layer.register_buffer("weight_min", layer.weight_min.float())
    y_wo = wo_layer(x)
    for y in (layer(x), layer(x[:1])):
        assert float((y - y_wo[:y.shape[0]]).abs().max() / y_wo.abs().max()) < 0.02


def test_quantize_blocks_round_trip():
    x = torch.randn(3, 64)
    xq, d = quantize_blocks(x)
    assert xq.dtype == torch.int8 and d.shape == (3, 2) and int(xq.abs().max()) == 127
    back = (xq.float().view(3, 2, 32) * d[..., None]).view(3, 64)
    assert float((back - x).abs().max()) <= float(d.max()) / 2 + 1e-6


@pytest.mark.slow
def test_w4a8_greedy_knows_paris_and_loads_gguf_q4_exactly():
    from scaleinfer import LLM, SamplingParams

    llm = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", max_model_len=256, quantization="w4a8")
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in out.outputs[0].text
    layer = llm.engine.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer.quant_method, W4A8) and layer.weight is None


@pytest.mark.parametrize("shape", [(64, 96), (37, 736), (200, 576), (70, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 16, A8_BLOCK_MAX_ROWS])
def test_w8a8_block32_matches_its_reference(path, shape, rows):
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
    more = torch.randn(A8_BLOCK_MAX_ROWS + 1, shape[1])  # past the kernel's rows: dequantized slices + BLAS
    torch.testing.assert_close(layer(more), F.linear(more, m.dequantize(layer), layer.bias), rtol=1e-5, atol=1e-5)


def test_block32_int8_takes_a_q8_0_tensor_exactly():
    """A Q8_0 tensor (quantized by gguf's own reference code) dequantized to fp32 and re-quantized with
    quantize_blocks32 gives back its int8 values and fp16 scales: the w4a8 LM head is the file's."""
    import gguf

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(4)) * 0.1
    w[3, :32] = 0.0                                                   # an all-zero block
    raw = gguf.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    dense = torch.from_numpy(gguf.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).copy()).float()
    blocks = torch.from_numpy(raw.copy()).view(48, 8, 34)           # per block: fp16 d, then 32 x int8
    d = blocks[..., :2].contiguous().view(torch.float16).view(48, 8)
    qs = blocks[..., 2:].contiguous().view(torch.int8).view(48, 256)
    q, scale = quantize_blocks32(dense)
    assert torch.equal(q, qs) and torch.equal(scale, d)
