"""Qwen2.5-Coder-1.5B-Instruct, the biggest real model in the catalog: its tokenizer is the 0.5B's, and
its logits and greedy continuations match HF transformers on the same GGUF (dequantized to fp32).

Memory: each side holds ~6.2 GB of fp32 weights, so ours runs first, keeps only its logits and tokens,
and is freed before HF loads (peak ~one model, not two)."""
from __future__ import annotations

import gc
import os

import pytest
import torch

from scaleinfer import catalog

NAME = "qwen2.5-coder-1.5b-instruct"
PROMPTS = ["def quicksort(arr):", "红楼梦的作者是", "The meaning of life is"]
MAX_TOKENS = 32


def _require(name: str) -> None:
    if not catalog.CATALOG[name].installed:
        pytest.skip(f"{name} is not installed (`scaleinfer pull {name}`)")


def _tokenizer(name: str):
    from scaleinfer.tokenizer import Tokenizer
    from scaleinfer.weights import gguf
    from scaleinfer.weights.gguf_file import GGUFFile

    fields = gguf.tokenizer_fields(GGUFFile.open(catalog.resolve(name, auto_pull=False)))
    return fields, Tokenizer.from_gguf_fields(fields)


def test_tokenizer_is_the_0_5b_s():
    """Same vocabulary, merges and special tokens; the chat template differs only in the tool-call text."""
    _require(NAME)
    _require("qwen2.5-coder-0.5b-instruct")
    small_fields, small = _tokenizer("qwen2.5-coder-0.5b-instruct")
    big_fields, big = _tokenizer(NAME)
    for key in small_fields.keys() - {"tokenizer.chat_template"}:
        assert big_fields[key] == small_fields[key], key
    for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert big.encode(text) == small.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "写一个快速排序"}]
    assert big.apply_chat_template(chat) == small.apply_chat_template(chat)
    assert big.eos_token_ids == small.eos_token_ids


def _ours(prompts_text: list[str]):
    """Our fp32 logits and greedy tokens for each prompt, the checkpoint path; the model is freed."""
    from scaleinfer import LLM, SamplingParams

    llm = LLM(NAME, quantization="none", kv_cache_memory="128MiB", max_model_len=1024, kv_cache_dtype="float32")
    prompts = [llm.tokenizer.encode(p) for p in prompts_text]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    results = [(ids, llm.engine.compute_logits(ids), llm.generate([ids], params)[0].outputs[0].token_ids)
               for ids in prompts]
    path = llm.engine.checkpoint_path
    del llm
    gc.collect()
    return results, path


@pytest.mark.slow
def test_real_qwen25_1_5b_matches_hf():
    transformers = pytest.importorskip("transformers")
    _require(NAME)
    results, path = _ours(PROMPTS)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32).eval()
    for ids, logits, tokens in results:
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0].float()
            ref_ids = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        diff = (logits - ref).abs().max().item()
        assert diff < 1e-3, f"max abs logit diff {diff} on {len(ids)} tokens"
        assert list(tokens) == ref_ids[0, len(ids):].tolist()
