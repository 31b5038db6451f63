"""Pipeline parallelism on real weights (Qwen2.5-Coder-0.5B, 24 layers): PP=2 (and TP=2 x PP=2) over spawned
local ranks gives one process's greedy continuations and logits. A stage boundary passes the residual
stream x + residual, which the next stage's first norm would have formed itself, so PP alone is bit-exact
(fp32, and w4a8 with an int8 KV cache); under TP x PP the row-parallel sums bound it as in the TP tests.
Each stage holds only its layers' weights and KV cache; the decode program runs each stage's layers."""
from __future__ import annotations

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import ParallelConfig
from scaleinfer.distributed.pipeline import SENDS_PER_STEP
from scaleinfer.distributed.stages import PPMissingLayer, stage_bounds
from tests.distributed.models import QWEN, needs
from tests.distributed.test_tensor_parallel import _compare, _run

pytestmark = needs(QWEN)


def _engine(pp: int, tp: int = 1, micro: int | None = None, **kw) -> LLM:
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, pipeline_micro_batches=micro,
                              distributed_timeout=60)
    return LLM(QWEN, threads=1, kv_cache_memory="32MiB", max_model_len=256, parallel=parallel, **kw)


def _layer_params(model) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in model.layers]


MIXED = [f"Write a Python function number {i} that" + " adds numbers" * (i % 5) for i in range(12)]


def _mixed(llm: LLM) -> list[list[int]]:
    """Twelve requests of different lengths at once (prefill chunks next to decodes), greedy."""
    params = [SamplingParams(max_tokens=6 + i % 7, temperature=0) for i in range(len(MIXED))]
    return [o.outputs[0].token_ids for o in llm.generate(MIXED, params)]


@pytest.fixture(scope="module")
def fp32_reference() -> dict:
    one = _engine(1, quantization="none", kv_cache_dtype="float32")
    out = _run(one)
    out["mixed"] = _mixed(one)
    out["layer_params"] = _layer_params(one.engine.model)
    out["embed_params"] = one.engine.model.embed_tokens.weight.numel()
    return out


def test_pp2_fp32_matches_one_process_and_holds_only_its_layers(fp32_reference):
    llm = _engine(2, quantization="none", kv_cache_dtype="float32")
    try:
        got = _run(llm)
        got["mixed"] = _mixed(llm)
        assert llm.engine.scheduler.max_in_flight == 2   # two micro-batches filled the pipeline
        # every step's sends were not kept alive (gloo sends report completion only when waited on)
        assert len(llm.engine.executor.links.pending) <= SENDS_PER_STEP * (2 + 2)
        runner = llm.engine.runner
        assert runner.decode_plan is not None and runner.decode_plan.program is not None  # stage 0's program
        model = runner.model
        half = stage_bounds(model.config, 2)[1]   # 17 of 24: the last stage's head weighs 9 layers
        assert half == 17 and len(model.layers) == half and len(runner.kv_caches) == half
        assert isinstance(model.norm, PPMissingLayer) and isinstance(model.lm_head, PPMissingLayer)
        held = sum(p.numel() for p in model.parameters())
        assert held == fp32_reference["embed_params"] + sum(fp32_reference["layer_params"][:half])
    finally:
        llm.engine.shutdown()
    assert got["tokens"] == fp32_reference["tokens"]
    assert torch.equal(got["logits"], fp32_reference["logits"])   # the same kernels on the same inputs
    assert got["logprobs"] == fp32_reference["logprobs"]          # decode steps: the program on each stage
    assert got["mixed"] == fp32_reference["mixed"]


def test_pp2_w4a8_int8_kv_matches_one_process():
    kw = dict(quantization="w4a8", kv_cache_dtype="int8")
    one = _engine(1, **kw)
    single = _run(one)
    del one
    llm = _engine(2, micro=1, **kw)   # one step in flight
    try:
        got = _run(llm)
    finally:
        llm.engine.shutdown()
    assert got["tokens"] == single["tokens"]
    assert torch.equal(got["logits"], single["logits"])
    assert got["logprobs"] == single["logprobs"]


def test_tp2_pp2_fp32_matches_one_process(fp32_reference):
    llm = _engine(2, tp=2, quantization="none", kv_cache_dtype="float32")
    try:
        got = _run(llm)
        assert llm.engine.runner.model_config.num_heads == 7 and len(llm.engine.runner.kv_caches) == 17
    finally:
        llm.engine.shutdown()
    _compare(fp32_reference, got)
