"""The engine on CUDA equals HF transformers on the same weights (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402


def test_cuda_fp32_matches_hf(tmp_path, smollm2_gguf_path):
    import os

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf_path),
                                               gguf_file=os.path.basename(smollm2_gguf_path)).save_pretrained(tmp_path)
    hf = hf.cuda()
    llm = LLM(str(tmp_path), device="cuda", kv_cache_memory="256MiB", max_model_len=512)
    ids = list(range(1000, 1200))
    with torch.inference_mode():
        ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    assert (llm.engine.compute_logits(ids) - ref).abs().max().item() < 1e-3
    out = llm.generate([ids[:16]], SamplingParams(temperature=0, max_tokens=16, min_tokens=16))[0]
    with torch.inference_mode():
        ref_ids = hf.generate(torch.tensor([ids[:16]], device="cuda"), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False)[0, 16:].tolist()
    assert out.outputs[0].token_ids == ref_ids
