"""A CTranslate2 WhisperSpec model (weights/ctranslate2.py reads the file) -> ModelConfig and the tensors of
models/whisper.py, by name.

CTranslate2 layout (ctranslate2/specs/whisper_spec.py, transformer_spec.py) -> ours:

    encoder/conv1, conv2, position_encodings/encodings   encoder.conv1, conv2, embed_positions.weight
    encoder/layer_N/self_attention/linear_0 (fused QKV)  encoder.layers.N.self_attn.qkv_proj
    .../self_attention/linear_1, layer_norm              .self_attn.out_proj, .self_attn_layer_norm
    .../ffn/linear_0, linear_1, layer_norm               .mlp.fc1, .mlp.fc2, .final_layer_norm
    decoder/embeddings/weight, position_encodings        decoder.embed_tokens.weight, embed_positions.weight
    decoder/layer_N/attention/linear_0 (Q), linear_1     decoder.layers.N.encoder_attn.q_proj, .kv_proj
      (fused K/V), linear_2, layer_norm                  .encoder_attn.out_proj, .encoder_attn_layer_norm
    encoder|decoder/layer_norm                           encoder|decoder.layer_norm

LayerNorm gamma/beta are weight/bias. The projection is tied to the embedding (an alias in the file).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import WeightLoadError
from scaleinfer.models.whisper import WhisperConfig
from scaleinfer.weights.ctranslate2 import CT2ModelFile

_LAYER_PARTS = {   # CTranslate2 sub-layer -> ours, per side
    "encoder": {"self_attention/linear_0": "self_attn.qkv_proj", "self_attention/linear_1": "self_attn.out_proj",
                "self_attention/layer_norm": "self_attn_layer_norm", "ffn/linear_0": "mlp.fc1",
                "ffn/linear_1": "mlp.fc2", "ffn/layer_norm": "final_layer_norm"},
    "decoder": {"self_attention/linear_0": "self_attn.qkv_proj", "self_attention/linear_1": "self_attn.out_proj",
                "self_attention/layer_norm": "self_attn_layer_norm", "attention/linear_0": "encoder_attn.q_proj",
                "attention/linear_1": "encoder_attn.kv_proj", "attention/linear_2": "encoder_attn.out_proj",
                "attention/layer_norm": "encoder_attn_layer_norm", "ffn/linear_0": "mlp.fc1",
                "ffn/linear_1": "mlp.fc2", "ffn/layer_norm": "final_layer_norm"},
}
_PARAMS = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def _name_map(ct2: CT2ModelFile) -> dict[str, str]:
    """CTranslate2 variable -> our checkpoint name ("model." + module path + param)."""
    out = {
        "encoder/conv1/weight": "encoder.conv1.weight", "encoder/conv1/bias": "encoder.conv1.bias",
        "encoder/conv2/weight": "encoder.conv2.weight", "encoder/conv2/bias": "encoder.conv2.bias",
        "encoder/position_encodings/encodings": "encoder.embed_positions.weight",
        "encoder/layer_norm/gamma": "encoder.layer_norm.weight", "encoder/layer_norm/beta": "encoder.layer_norm.bias",
        "decoder/embeddings/weight": "decoder.embed_tokens.weight",
        "decoder/position_encodings/encodings": "decoder.embed_positions.weight",
        "decoder/layer_norm/gamma": "decoder.layer_norm.weight", "decoder/layer_norm/beta": "decoder.layer_norm.bias",
    }
    for side, parts in _LAYER_PARTS.items():
        for i in range(ct2.count_layers(side)):
            for theirs, ours in parts.items():
                for p_theirs, p_ours in _PARAMS.items():
                    name = f"{side}/layer_{i}/{theirs}/{p_theirs}"
                    if ct2.has(name):
                        out[name] = f"{side}.layers.{i}.{ours}.{p_ours}"
    return {k: f"model.{v}" for k, v in out.items()}


def whisper_tensors(ct2: CT2ModelFile, config: ModelConfig, names_only: bool = False
                    ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(our checkpoint name, float32 tensor) of every weight; with names_only the tensors are None."""
    for theirs, ours in _name_map(ct2).items():
        yield ours, (None if names_only else ct2.tensor(theirs))


def read_whisper_config(ct2: CT2ModelFile, cfg: dict, path: str) -> ModelConfig:
    """ModelConfig (the decoder) + WhisperConfig from the file's shapes and scalars and its config.json."""
    emb = ct2.variables["decoder/embeddings/weight"].shape
    vocab, d = emb
    conv1 = ct2.variables["encoder/conv1/weight"].shape          # [d, n_mels, 3]
    ffn = ct2.variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    heads = ct2.scalar("decoder/num_heads")
    if d % heads:
        raise WeightLoadError(f"{path}: hidden size {d} is not a multiple of {heads} heads")
    wc = WhisperConfig(
        num_mel_bins=conv1[1], encoder_layers=ct2.count_layers("encoder"), encoder_heads=ct2.scalar("encoder/num_heads"),
        max_source_positions=ct2.variables["encoder/position_encodings/encodings"].shape[0],
        suppress_ids=tuple(cfg.get("suppress_ids") or ()),
        suppress_ids_begin=tuple(cfg.get("suppress_ids_begin") or ()), lang_ids=tuple(cfg.get("lang_ids") or ()))
    return ModelConfig(
        architecture="whisper", vocab_size=vocab, hidden_size=d, intermediate_size=ffn,
        num_layers=ct2.count_layers("decoder"), num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        max_position_embeddings=ct2.variables["decoder/position_encodings/encodings"].shape[0],
        tie_word_embeddings=True, attention_bias=True, name=os.path.basename(os.path.normpath(path)), arch_config=wc)


def with_special_tokens(config: ModelConfig, token_to_id, path: str) -> ModelConfig:
    """`config` with <|startoftranscript|> as bos and <|endoftext|> as eos, looked up in the tokenizer."""
    ids = {t: token_to_id(t) for t in ("<|startoftranscript|>", "<|endoftext|>")}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise WeightLoadError(f"{path}/tokenizer.json lacks {missing[0]}; is it a Whisper tokenizer?")
    return dataclasses.replace(config, bos_token_id=ids["<|startoftranscript|>"],
                               eos_token_ids=(ids["<|endoftext|>"],))


def hf_config_kwargs(config: ModelConfig) -> dict:
    """transformers.WhisperConfig arguments of a Whisper ModelConfig (parity tests, bench seq2seq)."""
    wc = config.arch_config
    return dict(vocab_size=config.vocab_size, num_mel_bins=wc.num_mel_bins, encoder_layers=wc.encoder_layers,
                encoder_attention_heads=wc.encoder_heads, decoder_layers=config.num_layers,
                decoder_attention_heads=config.num_heads, d_model=config.hidden_size,
                encoder_ffn_dim=config.intermediate_size, decoder_ffn_dim=config.intermediate_size,
                max_source_positions=wc.max_source_positions, max_target_positions=config.max_position_embeddings)


def hf_state_dict(tensors, hidden_size: int) -> dict[str, torch.Tensor]:
    """Our checkpoint tensors (fused self-attention Q/K/V, fused cross K/V) under HF
    WhisperForConditionalGeneration's names (separate projections; K has no bias there, CTranslate2's
    zeros are dropped; proj_out is the tied embedding)."""
    state = {}
    for name, t in tensors:
        name = name.replace(".mlp.fc", ".fc")
        for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")), (".kv_proj.", ("k_proj", "v_proj"))):
            if fused in name:
                for part, piece in zip(parts, t.split(hidden_size)):
                    if part == "k_proj" and name.endswith("bias"):
                        if piece.any():
                            raise WeightLoadError(f"{name}: the K part of the bias is not zero; HF Whisper has none")
                        continue
                    state[name.replace(fused.strip("."), part)] = piece
                break
        else:
            state[name] = t
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    return state
