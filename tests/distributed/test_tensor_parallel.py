"""Tensor parallelism on real weights (Qwen2.5-Coder-0.5B, 14 heads / 2 KV heads; Gemma 3 270M, one KV head
replicated): TP=2 over spawned local ranks gives the greedy continuations of one process, and logits
(prefill through model.forward, decode through the C++ decode program with the shared-memory all-reduce)
within 1e-4 of the largest logit in fp32. The row-parallel partial sums are added in another order than
one process's matmul, so the bits differ slightly (one process is bit-stable across thread counts).

Quantized activations (w4a8's int8 blocks) and an int8 KV cache round those 1e-7-relative differences to
whole int8 steps now and then, so their logits move further: as far as one process's logits move when its
embedding is perturbed by 1e-6 (relative). Their bound is twice that measured sensitivity."""
from __future__ import annotations

import pytest
import torch

from scaleinfer import LLM, SamplingParams
from tests.distributed.models import QWEN, GEMMA, needs

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n"]


def _engine(model: str, tp: int, **kw) -> LLM:
    return LLM(model, threads=1, tensor_parallel_size=tp, kv_cache_memory="32MiB", max_model_len=256,
               distributed_timeout=60, **kw)


TEXT = "The quick brown fox jumps over"


def _run(llm: LLM) -> dict:
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3)
    outs = llm.generate(PROMPTS, params)
    logits = llm.engine.compute_logits(llm.tokenizer.encode(TEXT))
    return {"tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[lp[t] for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs],
            "logits": logits}


def _sensitivity(llm: LLM, logits: torch.Tensor) -> float:
    """How far one process's logits move when its embedding is scaled by 1 + 1e-6 * noise (seeded)."""
    w = llm.engine.model.embed_tokens.weight
    w.data.mul_(1 + 1e-6 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    return (llm.engine.compute_logits(llm.tokenizer.encode(TEXT)) - logits).abs().max().item()


def _compare(single: dict, tp: dict, tolerance: float | None = None) -> None:
    """Same greedy tokens; logits within `tolerance` (default 1e-4 of the largest logit)."""
    assert tp["tokens"] == single["tokens"]
    scale = single["logits"].abs().max().item()
    tolerance = 1e-4 * scale if tolerance is None else tolerance
    diff = (tp["logits"] - single["logits"]).abs().max().item()
    assert diff <= tolerance, f"prefill logits differ by {diff} (largest logit {scale}, bound {tolerance})"
    for a, b in zip(single["logprobs"], tp["logprobs"]):   # decode steps: the decode program under TP
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=2 * tolerance, rtol=0)


def _pair(model: str, sensitivity: bool = False, **kw) -> tuple[dict, dict, LLM]:
    one = _engine(model, 1, **kw)
    single = _run(one)
    if sensitivity:
        single["sensitivity"] = _sensitivity(one, single["logits"])
    del one
    llm = _engine(model, 2, **kw)
    try:
        return single, _run(llm), llm
    finally:
        llm.engine.shutdown()


@needs(QWEN)
def test_tp2_qwen_fp32_matches_one_process():
    single, tp, llm = _pair(QWEN, quantization="none", kv_cache_dtype="float32")
    assert llm.engine.runner.decode_plan is not None and llm.engine.runner.decode_plan.program is not None
    _compare(single, tp)


@needs(QWEN)
def test_tp2_qwen_w4a8_int8_kv_matches_one_process():
    single, tp, _ = _pair(QWEN, sensitivity=True, quantization="w4a8", kv_cache_dtype="int8")
    assert single["sensitivity"] > 1e-3   # int8 activations do amplify tiny differences (else the bound is moot)
    _compare(single, tp, tolerance=2 * single["sensitivity"])


@needs(GEMMA)
def test_tp2_gemma_replicated_kv_head_matches_one_process():
    single, tp, llm = _pair(GEMMA, quantization="none", kv_cache_dtype="float32")
    assert llm.engine.runner.model_config.num_kv_heads == 1 and llm.engine.runner.model_config.num_heads == 2
    scale = single["logits"].abs().max().item()
    assert tp["tokens"] == single["tokens"]
    assert (tp["logits"] - single["logits"]).abs().max().item() <= 5e-4 * scale


@needs(QWEN)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallel needs two GPUs")
def test_tp2_nccl_on_two_gpus_matches_one_gpu():
    single, tp, llm = _pair(QWEN, quantization="none", device="cuda")
    assert llm.engine.executor.comm.name == "nccl"
    assert tp["tokens"] == single["tokens"]
