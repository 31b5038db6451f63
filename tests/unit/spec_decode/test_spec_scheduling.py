"""Speculative decoding without a model: n-gram lookup, the controller's choice of k, the scheduler's
bookkeeping of drafts (budget, limits, KV rollback and freed blocks, stops inside an accepted run), and
the step inputs' k + 1 decode rows."""
from __future__ import annotations

import pytest

from scaleinfer.config import CacheConfig, SchedulerConfig, SpeculativeConfig, speculative_config
from scaleinfer.errors import ConfigError
from scaleinfer.request import FinishReason, Request
from scaleinfer.runner.forward_batch import spec_step_inputs
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.scheduler import ModelOutput, Scheduler
from scaleinfer.spec_decode.controller import SpecController, expected_tokens
from scaleinfer.spec_decode.ngram import ngram_propose


def test_ngram_proposes_what_followed_the_latest_match():
    assert ngram_propose([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert ngram_propose([1, 2, 3, 9, 2, 3, 7, 2, 3], 2) == [7, 2]      # the latest occurrence wins
    assert ngram_propose([1, 2, 3, 4], 3) == []                          # nothing recurs
    assert ngram_propose([7, 8, 9, 1, 8, 9], 5, max_n=2) == [1, 8, 9]    # what there is, up to k
    assert ngram_propose([4, 1, 2, 5, 2], 2, max_n=3, min_n=2) == []     # a 1-token match is below min_n
    assert ngram_propose([4, 1, 2, 5, 2], 2, max_n=3, min_n=1) == [5, 2]


def test_controller_speculates_when_it_pays_and_stops_when_not():
    c = SpecController(max_k=4, adaptive=True, disable_by_batch_size=4)
    for _ in range(20):
        c.observe_verified("hi", 4, 4)
        c.observe_verified("lo", 4, 0)
    assert c.choose_k(["hi"], 1)["hi"] == 4
    assert c.choose_k(["lo"], 1)["lo"] == 0
    assert c.choose_k(["hi"], 5)["hi"] == 0            # above disable_by_batch_size
    # Measured step times override the prior: when extra rows cost as much as whole steps, k = 0.
    for rows in range(1, 6):
        c.observe_step(rows, 0.1 * rows, decode_only=True)
    assert c.choose_k(["hi"], 1)["hi"] == 0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_controller_probes_again_after_stopping():
    c = SpecController(max_k=4)
    for _ in range(20):
        c.observe_verified("r", 4, 0)
    ks = [c.choose_k(["r"], 1)["r"] for _ in range(40)]
    assert 0 in ks and 1 in ks and max(ks) == 1


def test_config_errors():
    with pytest.raises(ConfigError, match="needs --speculative-model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ConfigError, match="must be one of"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ConfigError, match="needs --speculative-method"):
        speculative_config(num_speculative_tokens=3)
    with pytest.raises(ConfigError, match="unknown keys"):
        speculative_config(config={"method": "ngram", "k": 3})
    assert speculative_config(model="m").method == "draft"
    cfg = speculative_config(config={"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 3})
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 6, 3)
    assert speculative_config(config={"method": "draft_model", "model": "m"}).method == "draft"


def make_scheduler(num_blocks=64, budget=64, max_len=256):
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=max_len),
                     CacheConfig(block_size=4, kv_cache_memory=1 << 20, enable_prefix_caching=True), num_blocks)


def decoding(s: Scheduler, prompt_len=6, **params) -> Request:
    """A request whose prompt has been computed and that has its first output token."""
    req = Request("r", list(range(10, 10 + prompt_len)), SamplingParams(**params), eos_token_ids=(2,))
    s.add_request(req)
    so = s.schedule()
    s.update(so, ModelOutput(sampled_token_ids={"r": 50}))
    return req


def test_drafts_are_checked_and_the_rejected_tail_rolled_back():
    s = make_scheduler()
    req = decoding(s, max_tokens=32)
    assert (req.num_tokens, req.num_computed_tokens, len(req.block_ids)) == (7, 6, 2)
    req.spec_token_ids = [51, 52, 53, 54, 55]
    so = s.schedule()
    assert so.num_scheduled_tokens == [6] and so.drafts(0) == [51, 52, 53, 54, 55]
    assert len(req.block_ids) == 3            # room for 12 tokens: 7 + 5 drafts
    inputs, sample_requests, spec = spec_step_inputs(so)
    assert inputs.query_lens == [1] * 6 and inputs.context_lens == [7, 8, 9, 10, 11, 12]
    assert inputs.input_ids == [50, 51, 52, 53, 54, 55] and inputs.logits_indices == [0, 1, 2, 3, 4, 5]
    assert sample_requests == [] and spec == [(req, [51, 52, 53, 54, 55])]
    free_before = s.block_manager.num_free_blocks
    s.update(so, ModelOutput(spec_token_ids={"r": [51, 99]}))   # one draft kept, then the target's token
    assert req.output_token_ids == [50, 51, 99]
    assert (req.num_tokens, req.num_computed_tokens) == (9, 8)
    assert len(req.block_ids) == 3 and s.block_manager.num_free_blocks == free_before
    req.spec_token_ids = [1, 2, 3, 4]          # 9 + 4 = 13 tokens need a 4th block
    so = s.schedule()
    assert len(req.block_ids) == 4
    s.update(so, ModelOutput(spec_token_ids={"r": [7]}))        # every draft rejected: back to 3 blocks
    assert (req.num_tokens, req.num_computed_tokens, len(req.block_ids)) == (10, 9, 3)
    assert s.block_manager.num_free_blocks == free_before


def test_drafts_are_cut_to_max_tokens_context_and_budget():
    s = make_scheduler(budget=8)
    req = decoding(s, max_tokens=4)
    req.spec_token_ids = [1, 2, 3, 4, 5]
    so = s.schedule()
    assert so.drafts(0) == [1, 2]              # 1 output so far, 3 left: 2 drafts + the target's token
    s2 = make_scheduler(budget=3)
    req2 = decoding(s2, prompt_len=3, max_tokens=100)
    req2.spec_token_ids = [1, 2, 3, 4, 5]
    assert s2.schedule().drafts(0) == [1, 2]   # budget 3: the last token + 2 drafts


def test_stop_inside_an_accepted_run_drops_the_rest():
    s = make_scheduler()
    req = decoding(s, max_tokens=32)
    req.spec_token_ids = [51, 2, 53]
    so = s.schedule()
    s.update(so, ModelOutput(spec_token_ids={"r": [51, 2, 53, 60]}))   # EOS (2) inside the run
    assert req.output_token_ids == [50, 51, 2] and req.finish_reason == FinishReason.STOP
    assert req.block_ids == [] and s.block_manager.num_free_blocks == 64
    s = make_scheduler()
    req = decoding(s, max_tokens=3)
    req.spec_token_ids = [51, 52, 53]
    so = s.schedule()
    s.update(so, ModelOutput(spec_token_ids={"r": [51, 52]}))
    assert req.output_token_ids == [50, 51, 52] and req.finish_reason == FinishReason.LENGTH


def test_spec_and_plain_requests_share_a_step():
    s = make_scheduler()
    a = decoding(s, max_tokens=32)
    b = Request("b", list(range(30, 35)), SamplingParams(max_tokens=8))
    s.add_request(b)
    a.spec_token_ids = [7, 8]
    so = s.schedule()
    assert [r.request_id for r in so.requests] == ["r", "b"] and so.num_scheduled_tokens == [3, 5]
    inputs, sample_requests, spec = spec_step_inputs(so)
    assert inputs.query_lens == [1, 1, 1, 5]
    assert sample_requests == [b] and inputs.logits_indices == [7, 0, 1, 2]   # b's last row first
    s.update(so, ModelOutput(sampled_token_ids={"b": 40}, spec_token_ids={"r": [7, 8, 9]}))
    assert a.output_token_ids == [50, 7, 8, 9] and b.output_token_ids == [40]


def test_requests_that_need_masks_beams_or_an_encoder_get_no_drafts():
    """Verification rows carry no grammar mask, beam candidates or cross-attention: such requests decode one
    token at a time while a plain request in the same step gets its n-gram drafts."""
    from scaleinfer.spec_decode.speculator import Speculator

    ids = [1, 2, 3, 4, 5, 1, 2, 3]
    reqs = [Request(name, ids, SamplingParams(max_tokens=32)) for name in ("plain", "grammar", "beam", "encoder")]
    reqs[1].grammar = object()
    reqs[2].beam_candidates = 8
    reqs[3].num_encoder_tokens = 1500
    for r in reqs:
        r.num_computed_tokens = len(ids) - 1
    Speculator(SpeculativeConfig(method="ngram", adaptive=False)).propose(reqs)
    assert reqs[0].spec_token_ids == [4, 5, 1, 2]
    assert [r.spec_token_ids for r in reqs[1:]] == [[], [], []]
