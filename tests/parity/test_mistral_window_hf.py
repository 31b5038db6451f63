"""Sliding-window attention chosen by the model's config (Mistral): a random-weight Mistral with a
window of 8 tokens, loaded from an HF directory, matches HF transformers on prompts several windows
long (logits and greedy tokens), and its KV blocks outside the window are freed as it decodes."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402
from scaleinfer.attention.patterns import AttentionPattern  # noqa: E402
from scaleinfer.kv_cache.block_manager import NULL_BLOCK  # noqa: E402


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, smollm2_gguf_path):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mistral")
    cfg = transformers.MistralConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=8, tie_word_embeddings=False)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf_path),
                                                     gguf_file=os.path.basename(smollm2_gguf_path))
    tok.save_pretrained(path)
    return str(path), model


def test_mistral_window_matches_hf(tiny_mistral):
    path, hf_model = tiny_mistral
    llm = LLM(path, quantization="none", kv_cache_memory="64MiB", max_model_len=512, block_size=4, max_num_batched_tokens=16,
              kv_cache_dtype="float32")
    assert set(llm.engine.attention_patterns) == {AttentionPattern.sliding_window(8)}
    torch.manual_seed(1)
    for n in (5, 40, 77):
        ids = torch.randint(0, 49152, (n,)).tolist()
        ours = llm.engine.compute_logits(ids)
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() < 1e-4, n
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
        with torch.inference_mode():
            ref_ids = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, n, dtype=torch.long),
                                        max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert out.outputs[0].token_ids == ref_ids[0, n:].tolist(), n


def test_window_matters_and_blocks_are_freed(tiny_mistral):
    """The window changes the result (the test above can fail) and decoding drops old blocks."""
    path, hf_model = tiny_mistral
    llm = LLM(path, quantization="none", kv_cache_memory="64MiB", max_model_len=512, block_size=4)
    dense = LLM(path, quantization="none", kv_cache_memory="64MiB", max_model_len=512, attention_pattern="causal")
    ids = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    assert (llm.engine.compute_logits(ids) - dense.engine.compute_logits(ids)).abs().max().item() > 1e-2
    engine = llm.engine
    engine.add_request("r", ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        req = engine.scheduler.requests.get("r")
        if req is not None:
            held.append(sum(b != NULL_BLOCK for b in req.block_ids))
    assert max(held[1:]) <= 8 // 4 + 2  # window of 8 tokens = 2 blocks of 4, + the partial and the next
