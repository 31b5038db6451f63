"""Each quantization mode on the real default model: greedy output stays sensible, and a prompt
(prefill, sliced BLAS / int8 matmul path) plus decode (kernel path) agree with the fp32 model's
next-token choice on a short factual prompt."""
from __future__ import annotations

import pytest

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
    fp32 = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", max_model_len=256)
    int8 = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", max_model_len=256, kv_cache_dtype="int8")
    assert int8.engine.kv_capacity_tokens >= 3.5 * fp32.engine.kv_capacity_tokens
    params = SamplingParams(temperature=0, max_tokens=8)
    out = int8.generate("The capital of France is", params)[0]
    assert "Paris" in out.outputs[0].text
