"""Speculative decoding never changes a greedy output: n-gram and draft-model proposers, batch 1 and mixed
batches (requests with and without drafts in one step), preemption, stop strings and max_tokens inside
an accepted run, logprobs; seeded sampling stays reproducible. Real SmolLM2-135M weights; the draft
model is SmolLM2 itself with some drafts corrupted after proposing, so rejections and KV rollback happen.
"""
from __future__ import annotations

import pytest

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import ConfigError

CODE = ("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
        "def sub(a, b):\n    return a - b\n")
PROMPTS = [
    "Repeat this code exactly:\n" + CODE + "\nHere it is again:\n",
    "The capital of France is",
    "one two three four one two three four one two three",
    "List three prime numbers:",
]
MAX_TOKENS = [40, 12, 24, 16]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


def greedy(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def make(spec=None, **kw):
    return LLM("smollm2-135m-instruct", quantization="none", max_model_len=512, kv_cache_memory=kw.pop("kv_cache_memory", "64MiB"),
               speculative_config=spec, **kw)


@pytest.fixture(scope="module")
def plain():
    llm = make()
    return llm, [llm.generate([p], greedy(n))[0].outputs[0] for p, n in zip(PROMPTS, MAX_TOKENS)]


@pytest.fixture(scope="module")
def ngram():
    return make(NGRAM)


def ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_ngram_batch_1_equals_plain(plain, ngram):
    _, ref = plain
    for p, n, r in zip(PROMPTS, MAX_TOKENS, ref):
        assert ngram.generate([p], greedy(n))[0].outputs[0].token_ids == r.token_ids
    stats = ngram.engine.speculator.stats
    assert stats.num_accepted_tokens > 10 and stats.num_draft_tokens > stats.num_accepted_tokens
    assert ngram.engine.num_free_blocks == ngram.engine.num_kv_blocks


def test_ngram_mixed_batch_equals_plain(plain, ngram):
    _, ref = plain
    before = ngram.engine.speculator.stats.num_steps_verified
    outs = ngram.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert ids(outs) == [r.token_ids for r in ref]
    assert [o.outputs[0].text for o in outs] == [r.text for r in ref]
    assert ngram.engine.stats.max_batch_size == len(PROMPTS)
    assert ngram.engine.speculator.stats.num_steps_verified > before


def test_max_tokens_and_stop_strings_inside_accepted_runs(plain, ngram):
    llm, _ = plain
    prompt = PROMPTS[0]
    for n in (2, 3, 7):
        assert ngram.generate([prompt], greedy(n))[0].outputs[0].token_ids == \
            llm.generate([prompt], greedy(n))[0].outputs[0].token_ids
    text = llm.generate([prompt], greedy(24))[0].outputs[0].text
    for stop, include in ((text[20:23], False), ("b\n", True)):
        params = greedy(24, stop=[stop], include_stop_str_in_output=include)
        want, got = llm.generate([prompt], params)[0].outputs[0], ngram.generate([prompt], params)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason), stop
        assert got.finish_reason == "stop" and len(got.token_ids) < 24


def test_logprobs_match(plain, ngram):
    llm, _ = plain
    params = greedy(12, logprobs=2)
    want, got = llm.generate([PROMPTS[0]], params)[0].outputs[0], ngram.generate([PROMPTS[0]], params)[0].outputs[0]
    assert got.token_ids == want.token_ids
    for a, b in zip(got.logprobs, want.logprobs):
        # The same rows, computed k + 1 at a time instead of one: fp32 rounding differs in the last digits.
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-2 for t in a)


def test_preemption_with_drafts_equals_plain(plain):
    _, ref = plain
    # 8 blocks of 16 tokens: fewer slots than the four requests need together.
    llm = make(NGRAM, kv_cache_memory=8 * 16 * 23040)
    assert llm.engine.num_kv_blocks == 8
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert llm.engine.scheduler.num_preemptions > 0
    assert ids(outs) == [r.token_ids for r in ref]
    assert llm.engine.num_free_blocks == 8


def _corrupting(draft):
    """Wrap a DraftProposer so every third proposal has its second draft replaced: rejections happen."""
    original, calls = draft.propose, [0]

    def propose(items):
        seconds = original(items)
        for req, _ in items:
            calls[0] += 1
            if calls[0] % 3 == 0 and len(req.spec_token_ids) > 1:
                req.spec_token_ids[1] = (req.spec_token_ids[1] + 1) % 1000
        return seconds
    draft.propose = propose


def test_draft_model_equals_plain(plain):
    _, ref = plain
    llm = make({"model": "smollm2-135m-instruct", "num_speculative_tokens": 3, "adaptive": False})
    _corrupting(llm.engine.speculator.draft)
    assert llm.generate([PROMPTS[1]], greedy(MAX_TOKENS[1]))[0].outputs[0].token_ids == ref[1].token_ids
    outs = llm.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert ids(outs) == [r.token_ids for r in ref]
    stats = llm.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    draft = llm.engine.speculator.draft
    assert draft.block_manager.num_free_blocks < draft.block_manager.num_blocks   # shadows live until the next step
    llm.generate(["x"], greedy(1))
    assert draft.block_manager.num_free_blocks == draft.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_with_drafts():
    llm = make({"model": "smollm2-135m-instruct", "num_speculative_tokens": 3, "adaptive": False})
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=11, ignore_eos=True)
    first = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    again = llm.generate([PROMPTS[0], PROMPTS[1]], [params, greedy(8)])[0].outputs[0].token_ids
    assert first == again and len(first) == 24
    assert llm.engine.speculator.stats.num_accepted_tokens > 0


def test_a_draft_with_another_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="does not share the target model's tokenizer"):
        make({"model": "gemma-3-270m"})
