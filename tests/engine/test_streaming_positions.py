"""StreamingLLM positions within the cache through the engine: a random tiny Llama trained for 64
positions streams hundreds of tokens with sinks + window + positions=cache, its KV stays bounded,
and its scores equal a row-by-row oracle that moves the sinks next to the window."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.attention.layer import Attention  # noqa: E402
from scaleinfer.attention.metadata import build_metadata  # noqa: E402
from scaleinfer.attention.patterns import CAUSAL, parse_pattern  # noqa: E402
from scaleinfer.attention.sdpa import rotate  # noqa: E402
from scaleinfer.errors import RequestError  # noqa: E402
from scaleinfer.kv_cache.block_manager import NULL_BLOCK  # noqa: E402

SPEC = "sinks=2,window=14,positions=cache"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_gguf_path):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf_path),
                                                     gguf_file=os.path.basename(smollm2_gguf_path))
    tok.save_pretrained(path)
    return str(path)


class RowByRowOracle:
    """Each query row attends its allowed keys, sinks rotated to sit right before the window."""

    def __init__(self, pattern):
        self.pattern = pattern

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, rope=None):
        n, heads, _ = q.shape
        group = heads // k.shape[1]
        out = torch.empty_like(q)
        pos = torch.arange(n)
        for r in range(n):
            keys = k[:r + 1].clone()
            s = self.pattern.sinks
            shift = self.pattern.sink_shift(r)
            keys[:s] = rotate(keys[:s], torch.tensor(shift), rope)
            scores = torch.einsum("hd,khd->hk", q[r], keys.repeat_interleave(group, 1)) * scale
            scores[:, ~self.pattern.allows(torch.tensor(r), pos[:r + 1])] = float("-inf")
            out[r] = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v[:r + 1].repeat_interleave(group, 1))
        return out


def test_stream_past_trained_positions_matches_oracle(tiny_llama):
    llm = LLM(tiny_llama, attention_pattern=SPEC, max_model_len=1000, kv_cache_memory="16MiB", block_size=4,
              max_num_batched_tokens=32, kv_cache_dtype="float32")   # an fp32 oracle
    engine = llm.engine
    assert engine.max_model_len == 1000  # past the model's 64 positions: distances stay <= 16
    ids = torch.randint(0, 49152, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    scored = engine.score_stream(ids, chunk=40)

    model = engine.model
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [(m.pattern, m.backend) for m in attns]
    try:
        for m in attns:
            m.pattern, m.backend = CAUSAL, RowByRowOracle(parse_pattern(SPEC))
        meta = build_metadata([300], [300], [[0] * 300], 1)
        positions = torch.arange(300)
        logits = model.forward(torch.tensor(ids), positions, [(None, None)] * len(attns), meta, positions)
    finally:
        for m, (p, b) in zip(attns, saved):
            m.pattern, m.backend = p, b
    ref = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(scored, ref, atol=1e-4, rtol=1e-4)

    # generation past position 64 with bounded KV
    engine.add_request("g", ids[:100], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        req = engine.scheduler.requests.get("g")
        if req is not None:
            held.append(sum(b != NULL_BLOCK for b in req.block_ids))
    assert max(held) <= 1 + 14 // 4 + 2 + 32 // 4


def test_text_positions_are_capped_by_the_model(tiny_llama):
    llm = LLM(tiny_llama, attention_pattern="sinks=2,window=14", max_model_len=1000, kv_cache_memory="16MiB")
    assert llm.engine.max_model_len == 64  # sinks at text distance would exceed what the model learned
    with pytest.raises(RequestError, match="context is 64 tokens"):
        llm.generate([list(range(100))], SamplingParams(max_tokens=4))


def test_the_position_cap_can_be_lifted_for_experiments(tiny_llama, monkeypatch):
    """SCALEINFER_ALLOW_LONG_MAX_MODEL_LEN=1 (cost measurements): the engine runs past the model's
    positions (the RoPE tables grow) instead of refusing the prompt."""
    from scaleinfer.config import ALLOW_LONG_ENV

    monkeypatch.setenv(ALLOW_LONG_ENV, "1")
    llm = LLM(tiny_llama, max_model_len=200, kv_cache_memory="16MiB")
    assert llm.engine.max_model_len == 200
    out = llm.generate([list(range(100))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
