"""Attention patterns through the whole engine on real SmolLM2-135M weights: chunked prefill, batched
decodes and the KV policy (freed blocks) give the tokens that a dense-mask oracle forward predicts,
and a sinks + window stream holds a bounded number of KV blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaleinfer import LLM, SamplingParams
from scaleinfer.attention.layer import Attention
from scaleinfer.attention.metadata import build_metadata
from scaleinfer.attention.patterns import CAUSAL, parse_pattern
from scaleinfer.errors import ConfigError
from scaleinfer.kv_cache.block_manager import NULL_BLOCK

TEXT = ("The history of the lighthouse keepers on the northern coast is long and strange. Every winter the "
        "storms came from the sea, and every winter the keepers wrote down the number of ships they saw, the "
        "height of the waves, and the names of the sailors who came ashore. ") * 12


class DenseMaskOracle:
    """Attention of one whole sequence under pattern.allows: no pages, no tiles, no freed blocks."""

    def __init__(self, pattern):
        self.pattern = pattern

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, rope=None):
        n = q.shape[0]
        pos = torch.arange(n)
        mask = self.pattern.allows(pos.unsqueeze(1), pos.unsqueeze(0))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(0, 1).contiguous()


def oracle_logits(llm: LLM, pattern, token_ids: list[int]) -> torch.Tensor:
    model = llm.engine.model
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [(m.pattern, m.backend) for m in attns]
    try:
        for m in attns:
            m.pattern, m.backend = CAUSAL, DenseMaskOracle(pattern)
        n = len(token_ids)
        meta = build_metadata([n], [n], [[0] * n], 1)
        positions = torch.arange(n)
        return model.forward(torch.tensor(token_ids), positions, [(None, None)] * len(attns), meta, positions)
    finally:
        for m, (p, b) in zip(attns, saved):
            m.pattern, m.backend = p, b


@pytest.mark.parametrize("spec", ["sinks=4,window=100", "window=64,global=0:40", "block=32,local=2,stride=4"])
def test_engine_with_pattern_matches_dense_mask_oracle(spec):
    pattern = parse_pattern(spec)
    llm = LLM("smollm2-135m-instruct", quantization="none", attention_pattern=spec, max_num_batched_tokens=128, max_model_len=4096,
              kv_cache_memory="64MiB", kv_cache_dtype="float32")   # an fp32 oracle
    engine = llm.engine
    prompt = llm.tokenizer.encode(TEXT)[:600]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine.add_request("a", prompt, params)
    engine.add_request("b", prompt[:333], params)  # a second request: decodes are batched
    peak_a = 0
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        req = engine.scheduler.requests.get("a")
        if req is not None:
            peak_a = max(peak_a, sum(b != NULL_BLOCK for b in req.block_ids))

    for rid, ids in (("a", prompt), ("b", prompt[:333])):
        tokens = outs[rid]
        logits = oracle_logits(llm, pattern, ids + tokens)[len(ids) - 1:-1]
        chosen = logits.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        # greedy choice of the engine is the oracle's argmax (up to float ties)
        assert torch.all(logits.max(1).values - chosen < 1e-3), (spec, rid)
    if pattern.kind == "sinks":  # 1 sink block + the window + one chunk of 128 tokens in flight
        assert peak_a <= 1 + 100 // 16 + 2 + 128 // 16
    else:  # a global prefix still ahead / summary blocks: some blocks are kept, the band is freed
        assert peak_a < -(-(600 + 24) // 16)


def test_bad_attention_pattern_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="needs a window"):
        LLM("smollm2-135m-instruct", attention_pattern="sinks=4")


def test_score_stream_equals_one_pass_and_frees_blocks():
    """Chunked scoring through the paged cache with the KV policy (blocks freed between chunks) gives
    the log-probabilities of a single full pass."""
    # fp32 KV: with f16 K/V, the last-bit differences between one pass and chunks (summation order) can
    # round a K/V value to a neighbouring f16 (~5e-4 relative), more than this test's 1e-4 tolerance
    llm = LLM("smollm2-135m-instruct", quantization="none", attention_pattern="sinks=4,window=60", kv_cache_memory="64MiB",
              kv_cache_dtype="float32")
    engine = llm.engine
    ids = llm.tokenizer.encode(TEXT)[:500]
    logits = engine.compute_logits(ids)
    one_pass = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    freed = []
    free_dead = engine.scheduler.block_manager.free_dead_blocks
    engine.scheduler.block_manager.free_dead_blocks = lambda r, live: freed.append(free_dead(r, live)) or freed[-1]
    chunked = engine.score_stream(ids, chunk=96)
    assert chunked.shape == (499,)
    torch.testing.assert_close(chunked, one_pass, atol=1e-4, rtol=1e-4)
    assert sum(freed) >= (500 - 64 - 96) // 16  # old blocks were dropped as the stream went
    assert engine.num_free_blocks == engine.num_kv_blocks
