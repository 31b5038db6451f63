"""Parity with HF transformers on the real SmolLM2-135M-Instruct weights (HF loads the same GGUF)."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "北京是中国的首都，也是",
]


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", quantization="none", max_model_len=2048, kv_cache_memory="256MiB",
               kv_cache_dtype="float32")  # fp32 parity: the default f16 KV rounds K/V


@pytest.fixture(scope="module")
def hf_model(llm):
    path = llm.engine.checkpoint_path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32)
    return model.eval()


SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "data" / "shakespeare-en.txt"


def long_prompt(llm, num_tokens=500) -> list[int]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = llm.tokenizer.encode(text)
    assert len(ids) >= num_tokens
    return ids[:num_tokens]


@torch.inference_mode()
def test_fp32_logits_match_hf(llm, hf_model):
    cases = [llm.tokenizer.encode(p) for p in PROMPTS] + [long_prompt(llm)]
    assert len(cases[-1]) == 500
    for ids in cases:
        ours = llm.engine.compute_logits(ids)
        ref = hf_model(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-3, f"max abs logit diff {diff} for a {len(ids)}-token prompt"


@torch.inference_mode()
def test_greedy_32_tokens_match_hf(llm, hf_model):
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        # min_tokens bans EOS exactly like HF's min_new_tokens, so both see the same distribution.
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), prompt
