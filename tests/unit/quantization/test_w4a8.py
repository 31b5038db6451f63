"""w4a8 and its block-32 int8 LM head as quantization methods: the prefill path, activation and weight
block quantization, GGUF Q4 / Q8_0 round trips, a real model. The kernels on every code path against
their reference: tests/kernel_tests/test_w4a8.py."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import W4A8, W4A8_MAX_ROWS, Int4WeightOnly, quantize_blocks
from scaleinfer.quantization.int8 import quantize_blocks32


def _layer(out_f: int, in_f: int, bias: bool) -> Linear:
    g = torch.Generator().manual_seed(0)
    layer = Linear(in_f, out_f, bias=bias)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g))
    return layer


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
