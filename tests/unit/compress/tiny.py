"""Tiny random Llama / Qwen2 HF directories (SmolLM2's tokenizer) for the prune and distill tests."""
from __future__ import annotations

import os

import torch

CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
}


def make_tiny(path, family: str, smollm2_gguf_path: str, seed: int = 0, edit=None) -> str:
    """Write a random tiny `family` model with SmolLM2's tokenizer to `path`; `edit(model)` may change its
    weights first."""
    import transformers

    torch.manual_seed(seed)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    model = cls[1](cls[0](vocab_size=49152, bos_token_id=1, eos_token_id=2, **CONFIGS[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():   # HF's init leaves biases at 0 and norms at 1: vary them
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        if edit is not None:
            edit(model)
    model.save_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf_path),
                                                     gguf_file=os.path.basename(smollm2_gguf_path))
    tok.save_pretrained(path)
    return str(path)


def hf_logits(path: str, ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]
