"""Tiny random-weight T5 / BART / Marian checkpoints that HF transformers builds offline (save_pretrained
into a directory, with a word-level tokenizer.json whose special tokens sit at each config's ids)."""
from __future__ import annotations

import json
import os

import torch

VOCAB = 99


def _tokenizer_json(specials: dict[int, str]) -> dict:
    vocab = {specials.get(i, f"w{i}"): i for i in range(VOCAB)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in sorted(specials.items())]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": specials.get(2, "w2")}}


def build(kind: str, path: str, seed: int = 0) -> str:
    """Write a tiny `kind` ("t5", "t5-gated", "bart", "marian") checkpoint directory at `path`."""
    import transformers as T

    common = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48, max_position_embeddings=64)
    if kind.startswith("t5"):
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                         feed_forward_proj="gated-gelu" if kind == "t5-gated" else "relu",
                         tie_word_embeddings=kind != "t5-gated")
        cls, specials = T.T5ForConditionalGeneration, {0: "<pad>", 1: "</s>", 2: "<unk>"}
    elif kind == "bart":
        cfg = T.BartConfig(**common)
        cls, specials = T.BartForConditionalGeneration, {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"}
    else:
        cfg = T.MarianConfig(**common, pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1, eos_token_id=0,
                             scale_embedding=True, activation_function="swish")
        cls, specials = T.MarianMTModel, {0: "</s>", 2: "<unk>", VOCAB - 1: "<pad>"}
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():   # weights large enough that outputs vary with the input (HF's init is ~0.02)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
        if hasattr(model, "final_logits_bias"):   # a random bias: it must be loaded and added
            model.final_logits_bias.normal_(0, 0.5)
    if kind == "bart":     # generation defaults of real checkpoints: bart-large-cnn forces <s> first
        model.generation_config.forced_bos_token_id = 0
    if kind == "marian":   # opus-mt never generates <pad>
        model.generation_config.bad_words_ids = [[VOCAB - 1]]
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(_tokenizer_json(specials), f)
    eos = specials_by_name(specials, "</s>")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": specials[eos], "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    return path


def specials_by_name(specials: dict[int, str], name: str) -> int:
    return next(i for i, t in specials.items() if t == name)


def load_hf(kind: str, path: str):
    import transformers as T

    cls = {"bart": T.BartForConditionalGeneration, "marian": T.MarianMTModel}.get(kind, T.T5ForConditionalGeneration)
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.forced_eos_token_id = None   # our engine has no forced-EOS rule (see the report)
    return model
