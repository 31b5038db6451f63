"""Scheduler unit tests: hand-built model outputs, no model, no torch."""
from __future__ import annotations

import pytest

from scaleinfer.config import CacheConfig, SchedulerConfig
from scaleinfer.request import FinishReason, Request, RequestStatus
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.scheduler import ModelOutput, Scheduler

EOS = 2


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_seqs=8, max_len=256, prefix=False):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len),
                     CacheConfig(block_size=block_size, kv_cache_memory=1 << 20, enable_prefix_caching=prefix),
                     num_blocks)


def make_request(rid, prompt_len, max_tokens=4, **kw):
    return Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=(EOS,))


def fake_tokens(sched_out, token_fn=lambda req: 1000 + req.num_output_tokens):
    out = ModelOutput()
    for i, req in enumerate(sched_out.requests):
        if sched_out.needs_sample(i):
            out.sampled_token_ids[req.request_id] = token_fn(req)
    return out


def run_to_end(s, token_fn=lambda req: 1000 + req.num_output_tokens, max_steps=1000):
    steps = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return steps
        so = s.schedule()
        assert not so.is_empty, "scheduler stalled with unfinished requests"
        steps.append([(r.request_id, n) for r, n in zip(so.requests, so.num_scheduled_tokens)])
        s.update(so, fake_tokens(so, token_fn))
    raise AssertionError("did not finish")


def test_chunked_prefill_then_decode():
    s = make_scheduler(budget=4)
    req = make_request("a", 10, max_tokens=3)
    s.add_request(req)
    steps = run_to_end(s)
    assert steps == [[("a", 4)], [("a", 4)], [("a", 2)], [("a", 1)], [("a", 1)]]
    assert req.output_token_ids == [1000, 1001, 1002]
    assert req.finish_reason == FinishReason.LENGTH
    assert s.block_manager.num_free_blocks == 64


def test_sampling_only_when_chunk_reaches_the_end():
    s = make_scheduler(budget=4)
    s.add_request(make_request("a", 6))
    so = s.schedule()
    assert not so.needs_sample(0)
    s.update(so, fake_tokens(so))
    so = s.schedule()
    assert so.num_scheduled_tokens == [2] and so.needs_sample(0)


def test_continuous_batching_shares_the_budget():
    s = make_scheduler(budget=8)
    a = make_request("a", 4, max_tokens=10)
    s.add_request(a)
    s.update(so := s.schedule(), fake_tokens(so))  # a prefilled, has 1 output token
    s.add_request(make_request("b", 20))
    so = s.schedule()
    # The running decode goes first, the new prompt takes the rest of the budget.
    assert [(r.request_id, n) for r, n in zip(so.requests, so.num_scheduled_tokens)] == [("a", 1), ("b", 7)]


def test_max_num_seqs_limits_admission():
    s = make_scheduler(max_seqs=2)
    for rid in "abc":
        s.add_request(make_request(rid, 2))
    so = s.schedule()
    assert [r.request_id for r in so.requests] == ["a", "b"]
    assert s.num_waiting == 1


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_tables_cover_computed_tokens(block_size):
    s = make_scheduler(block_size=block_size, budget=7)
    reqs = [make_request(str(i), 5 + 3 * i, max_tokens=6) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    while s.has_unfinished():
        so = s.schedule()
        for r, n, c in zip(so.requests, so.num_scheduled_tokens, so.num_computed_tokens):
            assert len(r.block_ids) * block_size >= c + n
            assert len(r.block_ids) == -(-(c + n) // block_size)
        s.update(so, fake_tokens(so))
    owned = [b for r in reqs for b in r.block_ids]
    assert owned == [] and s.block_manager.num_free_blocks == 64


def test_preemption_recomputes_and_every_request_finishes():
    # 6 blocks of 4 slots = 24 slots for three requests that need 12 slots each.
    s = make_scheduler(num_blocks=6, block_size=4, budget=32)
    reqs = [make_request(str(i), 6, max_tokens=6) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    run_to_end(s)
    assert s.num_preemptions > 0
    for r in reqs:
        assert r.status == RequestStatus.FINISHED
        # The fake model's token depends only on how many tokens were generated before it, so a
        # preempted request continues exactly where it was.
        assert r.output_token_ids == [1000, 1001, 1002, 1003, 1004, 1005]
    assert s.block_manager.num_free_blocks == 6


def test_preempted_request_recomputes_prompt_and_output():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    a, b = make_request("a", 7, max_tokens=20), make_request("b", 7, max_tokens=20)
    s.add_request(a)
    s.add_request(b)
    for _ in range(3):  # after two steps both hold 9 tokens; computing the 9th needs a third block each
        s.update(so := s.schedule(), fake_tokens(so))
    assert b.num_preemptions >= 1 or a.num_preemptions >= 1
    victim = b if b.num_preemptions else a
    assert victim.num_computed_tokens == 0 and victim.block_ids == []
    assert s.waiting[0] is victim


def test_stop_on_eos_stop_ids_and_min_tokens():
    s = make_scheduler()
    a = make_request("a", 3, max_tokens=10)
    b = make_request("b", 3, max_tokens=10, stop_token_ids=[77])
    c = make_request("c", 3, max_tokens=10, min_tokens=3)
    d = make_request("d", 3, max_tokens=5, ignore_eos=True)
    for r in (a, b, c, d):
        s.add_request(r)
    tokens = {"a": [5, EOS], "b": [77], "c": [EOS, EOS, EOS, EOS], "d": [EOS] * 5}
    run_to_end(s, lambda req: tokens[req.request_id][req.num_output_tokens])
    assert a.output_token_ids == [5, EOS] and a.finish_reason == FinishReason.STOP and a.stop_reason is None
    assert b.output_token_ids == [77] and b.stop_reason == 77
    assert c.output_token_ids == [EOS] * 4 and c.finish_reason == FinishReason.STOP
    assert d.output_token_ids == [EOS] * 5 and d.finish_reason == FinishReason.LENGTH


def test_max_model_len_ends_generation():
    s = make_scheduler(max_len=10)
    r = make_request("a", 8, max_tokens=100)
    s.add_request(r)
    run_to_end(s)
    assert r.num_tokens == 10 and r.finish_reason == FinishReason.LENGTH


def test_abort_frees_blocks_immediately():
    s = make_scheduler()
    r = make_request("a", 10, max_tokens=100)
    s.add_request(r)
    s.update(so := s.schedule(), fake_tokens(so))
    assert s.block_manager.num_free_blocks < 64
    s.finish_request("a", FinishReason.ABORT)
    assert s.block_manager.num_free_blocks == 64
    assert r.finish_reason == FinishReason.ABORT and not s.has_unfinished()
    # An update for a step that was already scheduled must not resurrect it.
    s.update(so, fake_tokens(so))
    assert r.num_output_tokens == 1


def test_prefix_caching_reuses_full_blocks():
    s = make_scheduler(block_size=4, budget=64, prefix=True)
    a = make_request("a", 10, max_tokens=1)
    s.add_request(a)
    run_to_end(s)
    b = make_request("b", 10, max_tokens=1)
    s.add_request(b)
    so = s.schedule()
    assert b.num_cached_tokens == 8  # two full blocks of the 10-token prompt
    assert so.num_scheduled_tokens == [2]
    s.update(so, fake_tokens(so))
    # A prompt that equals a cached one in whole blocks still computes its last token.
    c = make_request("c", 8, max_tokens=1)
    s.add_request(c)
    so = s.schedule()
    assert c.num_cached_tokens == 4 and so.num_scheduled_tokens == [4]


# ---- KV policy of bounded attention patterns ------------------------------------------------------
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern  # noqa: E402
from scaleinfer.kv_cache.block_manager import NULL_BLOCK  # noqa: E402


def test_sinks_window_stream_keeps_kv_blocks_bounded():
    """A 4,000-token stream (1,000-token prompt in chunks, then 3,000 decodes) with sinks + window holds
    at most sinks/window worth of blocks (+ the chunk being computed), and frees everything at the end."""
    bs, sinks, window, budget = 16, 4, 124, 64
    pattern = AttentionPattern.with_sinks(sinks, window)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=4, max_model_len=8192),
                  CacheConfig(block_size=bs, kv_cache_memory=1 << 20, enable_prefix_caching=True), 64,
                  [pattern, pattern])
    req = make_request("stream", 1000, max_tokens=3000)
    s.add_request(req)
    peak = 0
    while s.has_unfinished():
        so = s.schedule()
        s.update(so, fake_tokens(so))
        live = [b for b in req.block_ids if b != NULL_BLOCK]
        peak = max(peak, len(live))
        if not req.is_finished and req.num_computed_tokens > window + bs:  # the live blocks cover exactly what the pattern needs
            needed = {p // bs for s_, e in pattern.live_ranges(req.num_computed_tokens) for p in range(s_, e)}
            held = {i for i, b in enumerate(req.block_ids) if b != NULL_BLOCK}
            assert needed <= held and len(held - needed) <= -(-budget // bs) + 1
    assert req.num_tokens == 4000 and req.finish_reason == FinishReason.LENGTH
    # 1 sink block + ceil(124/16) + 1 window blocks + one chunk of 64 tokens in flight
    assert peak <= 1 + -(-window // bs) + 1 + budget // bs
    assert s.block_manager.num_free_blocks == 64


def test_a_causal_layer_keeps_every_block():
    """Gemma 3 style: window layers next to a global layer share one block table, so nothing is freed."""
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=8192),
                  CacheConfig(block_size=16, kv_cache_memory=1 << 20), 64,
                  [AttentionPattern.sliding_window(32), CAUSAL])
    req = make_request("g", 300, max_tokens=50)
    s.add_request(req)
    run_to_end(s)
    assert s.kv_patterns is None


def test_freed_blocks_of_a_shared_prefix_stay_with_their_other_owner():
    """Two requests share cached prompt blocks; one drops them (window), the other still holds them."""
    pattern = AttentionPattern.sliding_window(16)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=4, max_model_len=512),
                  CacheConfig(block_size=4, kv_cache_memory=1 << 20, enable_prefix_caching=True), 256, [pattern])
    a = make_request("a", 100, max_tokens=30)
    s.add_request(a)
    so = s.schedule()
    s.update(so, fake_tokens(so))
    assert sum(b == NULL_BLOCK for b in a.block_ids) > 0
    b = make_request("b", 100, max_tokens=30)  # same prompt: hits the prefix cache, even freed blocks
    s.add_request(b)
    so = s.schedule()
    assert b.num_cached_tokens == 96
    s.update(so, fake_tokens(so))
    run_to_end(s)
    bm = s.block_manager
    assert bm.num_free_blocks == 256 and all(c == 0 for c in bm.ref_counts)
