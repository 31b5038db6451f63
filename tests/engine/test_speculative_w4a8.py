"""Speculative decoding on w4a8 weights never changes a greedy output: the target verifies k + 1 draft rows
per request in one decode step, so every w4a8 kernel of a decode step (csrc/int4_a8.cpp's multi-row GEMV,
the block-32 int8 LM head) must give a row the same bits whatever rows run with it (tests/kernel_tests/
test_w4a8_batch_invariance.py). n-gram and draft-model proposers at batch 1 (mixed batches: the known gap
below), on real SmolLM2-135M weights; and Qwen2.5-Coder-0.5B Q4_K_M under `auto`, whose Q6_K tensors run
the per-channel int8 kernel (before it computed every row as at M = 1, a verified token's logits differed
from its decode step's by up to 0.2 on Qwen2.5-1.5B, and greedy outputs with speculation drifted).

Known gap: in a mixed batch, a prompt of at most W4A8_MAX_ROWS tokens prefilled in the same step as other
requests' rows runs the GEMM of csrc/a8_gemm.cpp (more than 16 rows in the step) instead of the decode
kernel it runs alone, and the two sum a group's float terms in a different order (tests/kernel_tests/
test_a8_gemm.py compares them within 1e-5, not bit for bit), so its KV (and then its greedy tokens) can
differ from the request run alone. A strict xfail of the mixed batch of PROMPTS stood here until the
GEMV's lane order (2026-12-05) happened to round these prompts' near-ties the GEMM's way: it passes by
luck, on this CPU's paths, so it is no longer a test of anything; the gap stands."""
from __future__ import annotations

import pytest
import torch

from scaleinfer import LLM

from test_speculative import MAX_TOKENS, NGRAM, PROMPTS, _corrupting, greedy, ids


def make(spec=None):
    return LLM("smollm2-135m-instruct", quantization="w4a8", max_model_len=512, kv_cache_memory="64MiB",
               speculative_config=spec)


@pytest.fixture(scope="module")
def plain():
    llm = make()
    return [llm.generate([p], greedy(n))[0].outputs[0].token_ids for p, n in zip(PROMPTS, MAX_TOKENS)]


def test_w4a8_ngram_equals_plain_batch_1(plain):
    llm = make(NGRAM)
    for p, n, want in zip(PROMPTS, MAX_TOKENS, plain):
        assert llm.generate([p], greedy(n))[0].outputs[0].token_ids == want
    stats = llm.engine.speculator.stats
    assert stats.num_accepted_tokens > 10 and stats.num_draft_tokens > stats.num_accepted_tokens


def test_w4a8_draft_model_equals_plain_batch_1(plain):
    llm = make({"model": "smollm2-135m-instruct", "num_speculative_tokens": 3, "adaptive": False})
    _corrupting(llm.engine.speculator.draft)
    for i in (0, 2):
        assert llm.generate([PROMPTS[i]], greedy(MAX_TOKENS[i]))[0].outputs[0].token_ids == plain[i]
    stats = llm.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.fixture(scope="module")
def qwen_auto():
    """Qwen2.5-Coder-0.5B Q4_K_M as auto loads it: Q4_K tensors W4A8, the 5-8-bit ones (most of the file)
    auto_int8(): block-32 int8 on AVX512-VNNI CPUs, per-channel int8 (csrc/lowbit_linear.cpp's int8_linear)
    elsewhere."""
    return LLM("qwen2.5-coder-0.5b-instruct", max_model_len=512, kv_cache_memory="64MiB",
               speculative_config=NGRAM)


@pytest.mark.slow
def test_auto_q4_k_m_verify_rows_equal_the_decode_step(qwen_auto):
    """The logits of a token verified with 1, 2 or 4 draft rows after it are the decode step's, bit for bit."""
    from scaleinfer.quantization.auto import auto_int8

    runner = qwen_auto.engine.runner
    methods = {type(layer.down.quant_method).__name__ for layer in runner.model.decode_layers().layers}
    assert methods == {"W4A8", auto_int8().__name__}, methods
    prompt = qwen_auto.tokenizer.encode(PROMPTS[0])
    _assert_verified_logits_equal_the_decode_step(runner, prompt, 512)


@pytest.mark.slow
def test_auto_q4_k_m_ngram_equals_plain_batch_1(qwen_auto):
    plain = LLM("qwen2.5-coder-0.5b-instruct", max_model_len=512, kv_cache_memory="64MiB")
    for p, n in zip(PROMPTS, MAX_TOKENS):
        want = plain.generate([p], greedy(n))[0].outputs[0].token_ids
        assert qwen_auto.generate([p], greedy(n))[0].outputs[0].token_ids == want
    assert qwen_auto.engine.speculator.stats.num_accepted_tokens > 10


def test_verify_rows_equal_the_decode_step_at_a_long_context():
    """At 1,100 tokens (decode attention splits a row's keys over the threads) a token verified with 1, 2
    or 4 draft rows after it has the decode step's logits, bit for bit: the split depends on the row's own
    length, not on the step's other rows (it once did, and greedy tokens with speculation drifted on a
    long summarization prompt)."""
    llm = LLM("smollm2-135m-instruct", quantization="w4a8", max_model_len=2048, kv_cache_memory="160MiB")
    runner = llm.engine.runner
    prompt = torch.randint(100, 40000, (1100,), generator=torch.Generator().manual_seed(0)).tolist()
    _assert_verified_logits_equal_the_decode_step(runner, prompt, 2048)


def _assert_verified_logits_equal_the_decode_step(runner, prompt: list[int], max_len: int) -> None:
    """Prefill `prompt`, then the logits of its next token with 1, 2 and 4 draft rows after it equal the
    plain decode step's, bit for bit."""
    from scaleinfer.runner.forward_batch import StepInputs

    n, table, drafts = len(prompt), list(range(max_len // runner.block_size)), [220, 262, 3553, 11, 13]
    runner.forward_inputs(StepInputs([n], [n], [table], prompt, [n - 1], list(range(n))))
    alone = runner.forward_inputs(StepInputs([1], [n + 1], [table], drafts[:1], [0], [n]))
    for rows in (2, 3, 5):
        verify = runner.forward_inputs(StepInputs([1] * rows, [n + 1 + i for i in range(rows)], [table] * rows,
                                                  drafts[:rows], list(range(rows)), [n + i for i in range(rows)]))
        assert torch.equal(verify[0], alone[0]), (rows, (verify[0] - alone[0]).abs().max())
