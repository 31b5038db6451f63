"""The engine's batching machinery never changes a request's greedy output: chunked prefill equals
unchunked, a mixed batch equals each request alone, and preemption under a tiny KV budget still
completes every request with the right tokens. Real SmolLM2-135M weights."""
from __future__ import annotations

import pytest

from scaleinfer import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three prime numbers:",
    "The quick brown fox",
    "In Python, a list comprehension is a concise way to create lists. For example, squares of the first "
    "ten integers can be written as",
    "Water boils at",
]
MAX_TOKENS = [12, 20, 8, 16, 24, 10]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    """Each prompt alone, unchunked, roomy cache."""
    llm = LLM("smollm2-135m-instruct", quantization="none", max_num_batched_tokens=2048, kv_cache_memory="128MiB")
    outs = [llm.generate([p], greedy(n))[0].outputs[0].token_ids for p, n in zip(PROMPTS, MAX_TOKENS)]
    return llm, outs


def test_mixed_batch_equals_alone(reference):
    llm, alone = reference
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.stats.max_batch_size == len(PROMPTS)


def test_chunked_prefill_equals_unchunked(reference):
    _, alone = reference
    llm = LLM("smollm2-135m-instruct", quantization="none", max_num_batched_tokens=7, kv_cache_memory="128MiB")
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.outputs[0].token_ids for o in outs] == alone


def test_tiny_kv_budget_preempts_and_completes(reference):
    _, alone = reference
    # 6 blocks of 16 tokens: fewer slots than the six requests need together (f16 KV: 23,040 bytes a token).
    llm = LLM("smollm2-135m-instruct", quantization="none", kv_cache_memory=6 * 16 * 23040, block_size=16)
    assert llm.engine.num_kv_blocks == 6
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert llm.engine.num_free_blocks == 6


def test_prefix_caching_keeps_outputs(reference):
    _, alone = reference
    llm = LLM("smollm2-135m-instruct", quantization="none",
              kv_cache_memory="128MiB", enable_prefix_caching=True, block_size=4)
    first = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    again = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.outputs[0].token_ids for o in first] == alone
    assert [o.outputs[0].token_ids for o in again] == alone


def test_seeded_sampling_independent_of_batch(reference):
    llm, _ = reference
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS, [params] * len(PROMPTS))
    assert batch[1].outputs[0].token_ids == alone


def test_prefix_cache_hits_and_compute_logits_leaves_it_intact(reference):
    _, alone = reference
    llm = LLM("smollm2-135m-instruct", quantization="none",
              kv_cache_memory="128MiB", enable_prefix_caching=True, block_size=4)
    first = llm.generate(PROMPTS[4], greedy(MAX_TOKENS[4]))[0]
    ids = llm.tokenizer.encode(PROMPTS[4])
    logits = llm.engine.compute_logits(ids)  # must not overwrite the cached prefix blocks
    assert logits.shape[0] == len(ids)
    again = llm.generate(PROMPTS[4], greedy(MAX_TOKENS[4]))[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == alone[4]
    assert llm.engine.scheduler.block_manager.prefix_cache.num_cached_blocks > 0
