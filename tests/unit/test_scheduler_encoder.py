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


def run_all(s, limit=200, after_step=None):
    """Step until every request finished; the ids of the requests whose encoder ran, in order. A preempted
    request holds no blocks."""
    encoded = []
    for _ in range(limit):
        if not s.has_unfinished():
            break
        so = step(s)
        encoded += [r.request_id for r in so.encoder_requests]
        for p in so.preempted:
            assert p.cross_block_ids == [] and p.block_ids == []
        if after_step is not None:
            after_step()
    assert not s.has_unfinished()
    return encoded


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
    encoded = run_all(s)
    assert s.num_preemptions > 0
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


def siblings(n, encoder_tokens=10, max_tokens=(4,), group="p", encoder_input=None):
    """The children of one n > 1 request: one encoder group, one encoder input object."""
    x = object() if encoder_input is None else encoder_input
    return [Request(f"{group}#{i}", [1, 2, 3], SamplingParams(max_tokens=max_tokens[i % len(max_tokens)],
                                                                ignore_eos=True),
                    encoder_input=x, num_encoder_tokens=encoder_tokens, encoder_group=group) for i in range(n)]


def test_siblings_share_one_encoder_run_and_its_cross_blocks():
    s = make_scheduler()
    kids = siblings(5, encoder_tokens=10, max_tokens=(2, 5, 3, 7, 4))
    for r in kids:
        s.add_request(r)
    so = step(s)
    assert so.encoder_requests == [kids[0]]
    cross = list(kids[0].cross_block_ids)
    assert len(cross) == 3 and all(r.cross_block_ids == cross for r in kids)
    assert [s.block_manager.ref_counts[b] for b in cross] == [5, 5, 5]
    assert s.block_manager.num_free_blocks == 64 - 3 - 5   # one set of cross blocks, one self block each
    holders = []
    while s.has_unfinished():
        assert step(s).encoder_requests == []
        holders.append(s.block_manager.ref_counts[cross[0]])
        assert holders[-1] == sum(not r.is_finished for r in kids)
    assert holders == sorted(holders, reverse=True) and holders[-1] == 0
    assert [len(r.output_token_ids) for r in kids] == [2, 5, 3, 7, 4]
    assert s.block_manager.num_free_blocks == 64 and not any(s.block_manager.ref_counts)


def test_different_groups_or_inputs_run_their_own_encoder():
    s = make_scheduler()
    x = object()
    a = siblings(2, group="a", encoder_input=x)
    b = siblings(2, group="b", encoder_input=x)         # same input object, another request
    c = siblings(1, group="a")                          # same group id, another input object
    for r in a + b + c:
        s.add_request(r)
    assert run_all(s) == ["a#0", "b#0", "a#0"]
    assert s.block_manager.num_free_blocks == 64 and not any(s.block_manager.ref_counts)


def test_without_sharing_each_child_runs_the_encoder(monkeypatch):
    monkeypatch.setattr(Scheduler, "share_encoder", False)
    s = make_scheduler()
    kids = siblings(3)
    for r in kids:
        s.add_request(r)
    assert run_all(s) == ["p#0", "p#1", "p#2"]
    assert s.block_manager.num_free_blocks == 64


def test_preempted_siblings_share_again_or_rerun_the_encoder_without_leaks():
    s = make_scheduler(num_blocks=12, block_size=4, budget=16)
    kids = siblings(4, encoder_tokens=12, max_tokens=(14,))
    for r in kids:
        s.add_request(r)

    def holders_counted():   # each cross block's reference count is the number of requests holding it
        for r in s.running:
            assert s.block_manager.ref_counts[r.cross_block_ids[0]] == sum(
                q.cross_block_ids[:1] == r.cross_block_ids[:1] for q in s.running + list(s.waiting))

    encoded = run_all(s, after_step=holders_counted)
    assert s.num_preemptions > 0
    assert encoded == ["p#0"]   # the preempted ones came back while a sibling still held the blocks
    assert all(r.output_token_ids == [7] * 14 for r in kids)
    assert s.block_manager.num_free_blocks == 12 and not any(s.block_manager.ref_counts)
