"""Pipeline parallelism on Gemma 3 270M (18 layers, sliding-window layers with a global one every sixth, a
scaled embedding, sandwich norms, a tied 262k-word head): PP=2 over spawned local ranks gives one process's
greedy continuations and logits (fp32). Gemma's layers add their outputs to x themselves, so the stream
between stages is x; each stage's layers keep their own kind (sliding or global) and RoPE base."""
from __future__ import annotations

import pytest
import torch

from scaleinfer import LLM
from scaleinfer.config import ParallelConfig
from scaleinfer.distributed.stages import PPMissingLayer, stage_bounds
from scaleinfer.weights.loader import open_checkpoint
from tests.distributed.models import GEMMA, needs
from tests.distributed.test_pipeline_parallel import _mixed
from tests.distributed.test_tensor_parallel import _compare, _run

pytestmark = needs(GEMMA)


def _engine(pp: int, partition: tuple[int, ...] | None = None, micro: int | None = None) -> LLM:
    parallel = ParallelConfig(pipeline_parallel_size=pp, pipeline_layer_partition=partition,
                              pipeline_micro_batches=micro, distributed_timeout=60)
    return LLM(GEMMA, threads=1, kv_cache_memory="32MiB", max_model_len=256, parallel=parallel,
               quantization="none", kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def reference() -> dict:
    one = _engine(1)
    out = _run(one)
    out["mixed"] = _mixed(one)
    out["sliding"] = [layer.sliding for layer in one.engine.model.layers]
    return out


@pytest.mark.parametrize("partition", [(9, 9), None])
def test_pp2_gemma_fp32_matches_one_process(reference, partition):
    llm = _engine(2, partition)
    try:
        got = _run(llm)
        got["mixed"] = _mixed(llm)
        model = llm.engine.runner.model
        first = partition[0] if partition else stage_bounds(model.config, 2)[1]
        assert len(model.layers) == first and len(llm.engine.runner.kv_caches) == first
        assert [layer.sliding for layer in model.layers] == reference["sliding"][:first]
        assert False in reference["sliding"][:first] and True in reference["sliding"][:first]
        assert isinstance(model.norm, PPMissingLayer) and isinstance(model.lm_head, PPMissingLayer)
        assert llm.engine.scheduler.max_in_flight == 2
    finally:
        llm.engine.shutdown()
    _compare(reference, got)
    assert got["mixed"] == reference["mixed"]
    assert torch.equal(got["logits"], reference["logits"])   # the same kernels on the same rows


def test_default_split_counts_gemmas_head():
    """Gemma 3 270M's head (262144 x 640) outweighs its 18 layers: the first stage takes all but one."""
    cfg = open_checkpoint(GEMMA).config
    assert stage_bounds(cfg, 2) == [0, 17, 18]


def test_tp2_pp2_gemma_fp32_matches_one_process(reference):
    parallel = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, pipeline_layer_partition=(9, 9),
                              distributed_timeout=60)
    llm = LLM(GEMMA, threads=1, kv_cache_memory="32MiB", max_model_len=256, parallel=parallel,
              quantization="none", kv_cache_dtype="float32")
    try:
        got = _run(llm)
        assert llm.engine.runner.model_config.num_heads == 2 and len(llm.engine.runner.kv_caches) == 9
    finally:
        llm.engine.shutdown()
    _compare(reference, got)
