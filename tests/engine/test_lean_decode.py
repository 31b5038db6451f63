"""The decode program (runner/decode_program.py: DecodePlan) runs the same kernels as the modules' forward:
greedy tokens and their log-probabilities are bit-identical with it on and off, for batched decodes
of different lengths (the batch shrinking as requests finish), in fp32 and the quantized modes (w4a8: a
fused QKV split into int4 q/k and int8 v with int4-g64), under a sliding-window pattern, and on each KV
cache dtype (float16 by default; float32, bfloat16 and int8 through the same program)."""
from __future__ import annotations

import pytest

import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.layers.fused import fused_ops
from scaleinfer.runner.decode_program import DecodePlan

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(fused_ops(torch.zeros(1)) is None, reason="CPU kernels not built (no compiler)")]

PROMPTS = ["The capital of France is", "List three colours:", "def fib(n):\n   "]


def _counting(calls):
    plan_run = DecodePlan.run

    def counting_run(self, *args):
        calls.append(1)
        return plan_run(self, *args)

    return counting_run


def _run(llm: LLM, lean: bool):
    llm.engine.runner.lean_decode = lean
    # different lengths: the decode batch shrinks 3 -> 2 -> 1 (the program's buffers per row count)
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=2, ignore_eos=True) for n in (12, 5, 8)]
    outs = llm.generate(PROMPTS, params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("mode", ["none", "int8", "w4a8", "int4-g64"])
def test_lean_decode_is_bit_identical(mode):
    llm = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", max_model_len=256, quantization=mode)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodePlan, "run", _counting(calls))
        lean = _run(llm, True)
    assert len(calls) >= 10                       # the decode steps went through the plan
    plan = llm.engine.runner.decode_plan
    assert plan.program is not None and plan.max_rows >= 3   # ... and its C++ program
    spec = plan.methods[0].decode_spec(plan.linears[0])
    if mode == "int4-g64":  # re-rounded, so the fused QKV is split: int4 q/k, int8 v (quantization/mixed.py)
        assert spec.kind == "split" and [p.kind for p in spec.parts] == ["int4", "int8"]
    elif mode == "w4a8":    # SmolLM2's Q4_1 v is taken as stored: one int4 QKV
        assert spec.kind == "w4a8"
    assert lean == _run(llm, False)


def test_lean_decode_under_a_sliding_window():
    llm = LLM("smollm2-135m-instruct", quantization="none",
              kv_cache_memory="64MiB", max_model_len=256, attention_pattern="window=8")
    assert _run(llm, True) == _run(llm, False)


@pytest.mark.parametrize("kv", ["float32", "bfloat16", "int8"])
def test_lean_decode_takes_every_kv_cache_dtype(kv):
    llm = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", max_model_len=256, quantization="w4a8",
              kv_cache_dtype=kv)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodePlan, "run", _counting(calls))
        lean = _run(llm, True)
    assert len(calls) >= 10 and llm.engine.runner.decode_plan.program is not None
    k_cache = llm.engine.runner.kv_caches[0][0]
    assert (k_cache.data if kv == "int8" else k_cache).dtype == getattr(torch, "int8" if kv == "int8" else kv)
    assert lean == _run(llm, False)
