"""Pipeline stages planned and failing: the layer split, what a stage loads, the refusals (pure), and a
stage that dies mid-run (one line within the timeout, no hang, the engine refuses further steps)."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import ModelConfig, ParallelConfig
from scaleinfer.distributed.stages import head_layers, plan_stage, stage_bounds, stage_tensors
from scaleinfer.errors import ConfigError, DistributedError, EngineDeadError

TIMEOUT = 20


def _cfg(layers: int, arch: str = "LlamaForCausalLM") -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers,
                       num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)


@pytest.mark.parametrize("layers, size, expected", [
    (24, 2, [(0, 12), (12, 24)]), (30, 4, [(0, 8), (8, 15), (15, 23), (23, 30)]), (3, 3, [(0, 1), (1, 2), (2, 3)])])
def test_layers_split_contiguously_and_evenly(layers, size, expected):
    """The tiny config's head (64 x 32) weighs 0.22 of a layer (32 x 96 + 3 x 32 x 64): nearly even."""
    assert abs(head_layers(_cfg(layers)) - 2048 / 9216) < 1e-9
    assert [(s.start, s.stop) for s in (plan_stage(_cfg(layers), r, size) for r in range(size))] == expected


def test_a_heavy_head_moves_layers_to_the_first_stages():
    """A head worth just under 5 layers (as Qwen2.5-1.5B's) on 28 layers: 16 + (12 + 5) for PP=2; every
    stage keeps at least one layer however heavy the head."""
    cfg = replace(_cfg(28), vocab_size=1430)
    assert stage_bounds(cfg, 2) == [0, 16, 28]
    assert stage_bounds(replace(cfg, vocab_size=10 ** 6), 3) == [0, 26, 27, 28]


def test_an_explicit_partition_is_followed_or_refused_in_one_line():
    assert [(s.start, s.stop) for s in (plan_stage(_cfg(28), r, 2, (14, 14)) for r in range(2))] == [(0, 14),
                                                                                                     (14, 28)]
    for bad in ((14, 13), (28, 0), (10, 10, 8)):
        with pytest.raises(ConfigError, match="--pipeline-layer-partition") as err:
            stage_bounds(_cfg(28), 2, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="gives 3 stages"):
        ParallelConfig(pipeline_parallel_size=2, pipeline_layer_partition=(10, 10, 8))


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="exceeds the model's 2 layers"):
        plan_stage(_cfg(2), 0, 3)
    assert plan_stage(_cfg(4, "Gemma3ForCausalLM"), 1, 2).stop == 4   # Gemma 3 splits too


def test_a_stage_loads_only_its_tensors():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
             "model.layers.2.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight",
             "lm_head.weight"]
    cfg = _cfg(4)
    first, last = plan_stage(cfg, 0, 2), plan_stage(cfg, 1, 2)
    kept = lambda stage, tied: [n for n, _ in stage_tensors(((n, None) for n in names), stage, tied)]
    assert kept(first, False) == names[:3]
    assert kept(last, False) == names[3:]
    assert kept(last, True) == [names[0]] + names[3:]   # a tied head is the embedding's weight


def test_a_stage_that_dies_is_one_line_error():
    llm = LLM(threads=1, pipeline_parallel_size=2, kv_cache_memory="16MiB", max_model_len=128,
              distributed_timeout=TIMEOUT)
    params = SamplingParams(max_tokens=4, temperature=0)
    assert llm.generate(["Hello", "Bye"], params)[0].outputs[0].token_ids
    worker = llm.engine.executor.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DistributedError) as err:
        llm.generate(["Hello again", "and again"], SamplingParams(max_tokens=64, temperature=0))
    assert time.monotonic() - start < TIMEOUT + 10
    message = str(err.value)
    assert "\n" not in message and "rank 1" in message and "pipeline" in message, message
    with pytest.raises(EngineDeadError):
        llm.generate("once more", params)
    llm.engine.shutdown()
    assert not worker.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL pipeline parallelism needs two GPUs (one rank per GPU)")
def test_pp2_on_two_gpus_matches_one_gpu():
    params = SamplingParams(max_tokens=8, temperature=0)
    one = LLM(device="cuda", kv_cache_memory="64MiB", max_model_len=128)
    single = one.generate(["Hello", "The capital of France is"], params)
    del one
    llm = LLM(device="cuda", pipeline_parallel_size=2, kv_cache_memory="64MiB", max_model_len=128)
    try:
        got = llm.generate(["Hello", "The capital of France is"], params)
    finally:
        llm.engine.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in single]
