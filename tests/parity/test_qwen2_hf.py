"""Qwen2 parity with HF transformers: a small random-weight Qwen2 (always, through our safetensors
loader) and the real Qwen2.5-Coder-0.5B weights (HF loads the same GGUF) when they are installed."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402

PROMPTS = ["def quicksort(arr):", "红楼梦的作者是", "The meaning of life is"]


def compare(llm, hf_model, prompts, tol):
    for ids in prompts:
        ours = llm.engine.compute_logits(ids)
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        assert diff < tol, f"max abs logit diff {diff} on {len(ids)} tokens"
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
        with torch.inference_mode():
            ref_ids = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == ref_ids[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, smollm2_gguf_path):
    """A random-weight Qwen2 saved as an HF directory, with a real tokenizer.json."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    cfg = transformers.Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rope_theta=1e6, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf_path),
                                                     gguf_file=os.path.basename(smollm2_gguf_path))
    tok.save_pretrained(path)
    return str(path), model


def test_tiny_random_qwen2_matches_hf(tiny_qwen2_dir):
    path, hf_model = tiny_qwen2_dir
    llm = LLM(path, quantization="none", kv_cache_memory="64MiB", max_model_len=512, kv_cache_dtype="float32")
    assert llm.engine.model_config.architecture == "qwen2" and llm.engine.model_config.attention_bias
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    compare(llm, hf_model, prompts, 1e-4)


def test_real_qwen25_matches_hf():
    from scaleinfer import catalog

    if not catalog.CATALOG["qwen2.5-coder-0.5b-instruct"].installed:
        pytest.skip("qwen2.5-coder-0.5b-instruct is not installed")
    llm = LLM("qwen2.5-coder-0.5b-instruct", quantization="none", kv_cache_memory="128MiB", max_model_len=1024,
              kv_cache_dtype="float32")
    path = llm.engine.checkpoint_path
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()
    compare(llm, hf_model, [llm.tokenizer.encode(p) for p in PROMPTS], 1e-3)
