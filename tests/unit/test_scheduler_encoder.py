"""Encoder-decoder requests in the scheduler and block manager (models/encoder_decoder.py): cross blocks
come from the same pool at admission and leave with the request, the encoder runs once per admission
(again after a preemption), its states are bounded per step, and prefixes are never shared."""
from __future__ import annotations

from scaleinfer.config import CacheConfig, SchedulerConfig
from scaleinfer.request import Request
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.scheduler import ModelOutput, Scheduler


def make_scheduler(num_blocks=64, block_size=4, budget=16, prefix=False):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256),
                     CacheConfig(block_size=block_size, kv_cache_memory=1 << 20, enable_prefix_caching=prefix),
                     num_blocks)


def encdec_request(rid, encoder_tokens=10, prompt=(1, 2, 3), max_tokens=4):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   encoder_input=object(), num_encoder_tokens=encoder_tokens)


def step(s):
    so = s.schedule()
    out = ModelOutput()
    for i, req in enumerate(so.requests):
        if so.needs_sample(i):
            out.sampled_token_ids[req.request_id] = 7
    s.update(so, out)
    return so


def test_cross_blocks_allocated_once_and_freed():
    s = make_scheduler()
    req = encdec_request("a", encoder_tokens=10)
    s.add_request(req)
    so = step(s)
    assert so.encoder_requests == [req]
    assert len(req.cross_block_ids) == 3 and len(req.block_ids) == 1   # ceil(10 / 4), ceil(3 / 4)
    assert not set(req.cross_block_ids) & set(req.block_ids)
    assert s.block_manager.num_free_blocks == 64 - 4
    so = step(s)
    assert so.encoder_requests == [] and so.num_scheduled_tokens == [1]
    while s.has_unfinished():
        step(s)
    assert req.cross_block_ids == [] and s.block_manager.num_free_blocks == 64


def test_encoder_states_per_step_are_bounded_but_the_first_always_fits():
    s = make_scheduler(budget=16)
    reqs = [encdec_request(r, encoder_tokens=12) for r in "abc"]
    big = encdec_request("big", encoder_tokens=40)
    for r in [big, *reqs]:
        s.add_request(r)
    assert step(s).encoder_requests == [big]          # 40 > 16, but first of its step
    assert step(s).encoder_requests == [reqs[0]]      # 12 fits, 12 + 12 does not
    assert step(s).encoder_requests == [reqs[1]]


def test_preemption_frees_cross_blocks_and_reruns_the_encoder():
    s = make_scheduler(num_blocks=9, block_size=4, budget=16)
    a, b = encdec_request("a", 12, max_tokens=12), encdec_request("b", 12, max_tokens=12)
    s.add_request(a)
    s.add_request(b)
    encoded = []
    for _ in range(60):
        if not s.has_unfinished():
            break
        so = step(s)
        encoded += [r.request_id for r in so.encoder_requests]
        for p in so.preempted:
            assert p.cross_block_ids == [] and p.block_ids == []
    assert not s.has_unfinished() and s.num_preemptions > 0
    assert sorted(encoded) == sorted(["a", "b"] + ["b"] * s.num_preemptions)
    assert a.output_token_ids == [7] * 12 and b.output_token_ids == [7] * 12
    assert s.block_manager.num_free_blocks == 9


def test_prefix_cache_is_not_used_for_encoder_decoder_requests():
    s = make_scheduler(prefix=True)
    a, b = encdec_request("a", prompt=range(1, 10)), encdec_request("b", prompt=range(1, 10))
    s.add_request(a)
    while s.has_unfinished():
        step(s)
    s.add_request(b)
    step(s)
    assert b.num_cached_tokens == 0
