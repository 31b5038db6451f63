"""Each quantization mode on the real default model: greedy output stays sensible, and a prompt
(prefill, sliced BLAS / int8 matmul path) plus decode (kernel path) agree with the fp32 model's
next-token choice on a short factual prompt."""
from __future__ import annotations

import pytest
import torch

from scaleinfer import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_greedy_completion_knows_paris(mode):
    llm = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", max_model_len=256, quantization=mode)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in out.outputs[0].text
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=40))[0]
    assert "Paris" in reply.outputs[0].text
    assert llm.engine.model.lm_head.weight is None  # packed, the dense copy is gone


def test_int8_kv_cache_greedy_and_capacity():
    fp32 = LLM("smollm2-135m-instruct", quantization="none", kv_cache_memory="64MiB", max_model_len=256,
               kv_cache_dtype="float32")
    int8 = LLM("smollm2-135m-instruct", quantization="none",
               kv_cache_memory="64MiB", max_model_len=256, kv_cache_dtype="int8")
    assert int8.engine.kv_capacity_tokens >= 3.5 * fp32.engine.kv_capacity_tokens
    params = SamplingParams(temperature=0, max_tokens=8)
    out = int8.generate("The capital of France is", params)[0]
    assert "Paris" in out.outputs[0].text


@pytest.mark.parametrize("model,mode", [("smollm2-135m-instruct", "int4"), ("gemma-3-270m", "int4"),
                                        ("smollm2-135m-instruct", "w4a8")])
def test_int4_takes_gguf_4bit_tensors_exactly(model, mode):
    """SmolLM2's Q4_1 linears and Gemma 3's Q4_K ones load as stored: the int4 weight equals the dense
    (fp32) load of the same file bit for bit; its Q5_0 / Q6_K / Q8_0 ones are quantized as usual.
    w4a8 keeps Q4_1 exact too (its fp16 scales hold Q4_1's fp16 scales as they are)."""
    from scaleinfer.config import EngineConfig
    from scaleinfer.engine.loading import build_model
    from scaleinfer.layers.linear import Linear
    from scaleinfer.weights.gguf_file import GGUFFile
    from scaleinfer.weights.loader import open_checkpoint

    ckpt = open_checkpoint(model)
    direct = {t.name for t in GGUFFile.open(ckpt.path).tensors if t.type_name in ("Q4_0", "Q4_1", "Q4_K")}
    dense = dict(build_model(ckpt, EngineConfig(model=model, quantization="none")).named_modules())
    int4 = build_model(open_checkpoint(model), EngineConfig(model=model, quantization=mode))
    exact = 0
    for name, layer in int4.named_modules():
        if not isinstance(layer, Linear) or name.endswith("lm_head"):
            continue
        i = name.split(".")[1]
        if name.endswith("mlp.down_proj") and f"blk.{i}.ffn_down.weight" in direct:
            assert torch.equal(layer.quant_method.dequantize(layer), dense[name].weight), name
            exact += 1
        elif model.startswith("smollm2"):  # all Q4_1: fused qkv and gate_up too
            assert torch.equal(layer.quant_method.dequantize(layer), dense[name].weight), name
            exact += 1
    assert exact == (120 if model.startswith("smollm2") else 9)
