"""BART (Lewis et al. 2019) and Marian (MarianMT / opus-mt): post-norm Transformer encoder-decoders with a
shared, tied token embedding and a final_logits_bias on the LM head. BART has learned positions (offset 2)
and a LayerNorm on the embeddings; Marian has sinusoidal positions (sin half, cos half), scales the
embeddings by sqrt(d_model) and has no embedding norm. Both live here: they differ only in those three
things (BartConfig says which). The checkpoint's position-only generation defaults are applied to the
logits: forced_bos_token_id (the first generated token) and single-token bad_words_ids (opus-mt's <pad>).

Implements models/encoder_decoder.py: the encoder runs once per request (batched, padded, plain SDPA),
each decoder layer's cross K/V are computed once (cross_kv) and read from the paged cache; decoder
self-attention is the ordinary paged Attention. Reference: HF transformers `modeling_bart.py`,
`modeling_marian.py` (the parity oracles); module names follow the HF checkpoints.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.cross import CrossAttention
from scaleinfer.attention.layer import Attention
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError
from scaleinfer.layers.linear import Linear
from scaleinfer.models.seq2seq_common import (
    activation, check_source_ids, flatten_real, pad_batch, sinusoidal_table,
)


@dataclass(frozen=True)
class BartConfig:
    """What ModelConfig (the decoder's dims) does not say about a BART / Marian model (ModelConfig.arch_config)."""

    encoder_layers: int
    encoder_heads: int
    encoder_ffn_dim: int
    activation: str
    scale_embedding: bool
    layernorm_embedding: bool          # BART: LayerNorm after embeddings + positions
    sinusoidal_positions: bool         # Marian: fixed sinusoids; BART: learned, offset 2
    decoder_start_token_id: int
    pad_token_id: int
    max_source_positions: int
    forced_bos_token_id: int | None = None
    """The first generated token is forced to this id (bart-large-cnn: <s>), as HF's ForcedBOS processor."""
    suppress_ids: tuple[int, ...] = ()
    """Tokens never generated (single-token bad_words_ids: opus-mt bans <pad>)."""


def _generation_defaults(cfg: dict, cfg_file: str) -> dict:
    """config.json's generation fields under generation_config.json's (HF 5 writes them there)."""
    path = os.path.join(os.path.dirname(cfg_file), "generation_config.json")
    gen = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    return {k: gen.get(k, cfg.get(k)) for k in ("forced_bos_token_id", "bad_words_ids")}


def read_bart_config(cfg: dict, cfg_file: str, marian: bool = False) -> ModelConfig:
    """config.json of BartForConditionalGeneration / MarianMTModel -> ModelConfig (the decoder's dims)."""
    if cfg.get("normalize_before") or cfg.get("add_final_layer_norm"):
        raise UnsupportedModelError(f"{cfg_file}: pre-norm BART variants (mBART) are not supported")
    if marian and cfg.get("decoder_vocab_size", cfg["vocab_size"]) != cfg["vocab_size"]:
        raise UnsupportedModelError(f"{cfg_file}: Marian with separate source and target vocabularies is not "
                                    f"supported (decoder_vocab_size != vocab_size)")
    d, heads = cfg["d_model"], cfg["decoder_attention_heads"]
    activation(cfg.get("activation_function", "gelu"), cfg_file)
    gen = _generation_defaults(cfg, cfg_file)
    arch = BartConfig(
        encoder_layers=cfg["encoder_layers"], encoder_heads=cfg["encoder_attention_heads"],
        encoder_ffn_dim=cfg["encoder_ffn_dim"], activation=cfg.get("activation_function", "gelu"),
        scale_embedding=bool(cfg.get("scale_embedding", False)), layernorm_embedding=not marian,
        sinusoidal_positions=marian, decoder_start_token_id=cfg["decoder_start_token_id"],
        pad_token_id=cfg["pad_token_id"], max_source_positions=cfg["max_position_embeddings"],
        forced_bos_token_id=gen["forced_bos_token_id"],
        suppress_ids=tuple(w[0] for w in gen["bad_words_ids"] or () if len(w) == 1))
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        architecture="marian" if marian else "bart", vocab_size=cfg["vocab_size"], hidden_size=d,
        intermediate_size=cfg["decoder_ffn_dim"], num_layers=cfg["decoder_layers"], num_heads=heads,
        num_kv_heads=heads, head_dim=d // heads, max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()), name=cfg.get("_name_or_path", ""),
        arch_config=arch)


def read_marian_config(cfg: dict, cfg_file: str) -> ModelConfig:
    return read_bart_config(cfg, cfg_file, marian=True)


def _norm(d: int, dtype: torch.dtype) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=1e-5, dtype=dtype)


def _projections(module: nn.Module, d: int, dtype: torch.dtype) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(module, name, Linear(d, d, True, dtype))


class BartEncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, act, dtype: torch.dtype):
        super().__init__()
        self.heads, self.act = heads, act
        self.self_attn = nn.Module()
        _projections(self.self_attn, d, dtype)
        self.self_attn_layer_norm = _norm(d, dtype)
        self.fc1 = Linear(d, ffn, True, dtype)
        self.fc2 = Linear(ffn, d, True, dtype)
        self.final_layer_norm = _norm(d, dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [b, t, d]; mask: [b, 1, 1, t] keys to attend."""
        b, t, d = x.shape
        sa, hd = self.self_attn, d // self.heads
        q, k, v = (p(x).view(b, t, self.heads, hd).transpose(1, 2) for p in (sa.q_proj, sa.k_proj, sa.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, d)
        x = self.self_attn_layer_norm(x + sa.out_proj(a))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class BartDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, act, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.heads, self.head_dim, self.act = h, hd, act
        self.self_attn = nn.Module()
        _projections(self.self_attn, d, dtype)
        self.self_attn.attn = Attention(h, h, hd, hd ** -0.5, backend)
        self.self_attn_layer_norm = _norm(d, dtype)
        self.encoder_attn = nn.Module()
        _projections(self.encoder_attn, d, dtype)
        self.encoder_attn.attn = CrossAttention(h, h, hd, hd ** -0.5, backend)
        self.encoder_attn_layer_norm = _norm(d, dtype)
        self.fc1 = Linear(d, cfg.intermediate_size, True, dtype)
        self.fc2 = Linear(cfg.intermediate_size, d, True, dtype)
        self.final_layer_norm = _norm(d, dtype)

    def forward(self, x, kv_cache, meta: AttentionMetadata, cross_meta: AttentionMetadata) -> torch.Tensor:
        n, h, hd = x.shape[0], self.heads, self.head_dim
        sa, ca = self.self_attn, self.encoder_attn
        q, k, v = (p(x).view(n, h, hd) for p in (sa.q_proj, sa.k_proj, sa.v_proj))
        x = self.self_attn_layer_norm(x + sa.out_proj(sa.attn(q, k, v, kv_cache, meta).view(n, h * hd)))
        q = ca.q_proj(x).view(n, h, hd)
        x = self.encoder_attn_layer_norm(x + ca.out_proj(ca.attn(q, kv_cache, cross_meta).view(n, h * hd)))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))

    def cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, ca = states.shape[0], self.encoder_attn
        return ca.k_proj(states).view(n, self.heads, self.head_dim), ca.v_proj(states).view(n, self.heads, self.head_dim)


class _Stack(nn.Module):
    """Positions (+ the embedding norm) and the layers of one side; the token embedding is the model's."""

    def __init__(self, layers: list[nn.Module], d: int, bc: BartConfig, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.sinusoidal = bc.sinusoidal_positions
        if bc.sinusoidal_positions:
            self.register_buffer("positions", sinusoidal_table(max_positions, d).to(dtype), persistent=False)
        else:
            self.embed_positions = nn.Embedding(max_positions + 2, d, dtype=dtype)   # BART's offset of 2
        if bc.layernorm_embedding:
            self.layernorm_embedding = _norm(d, dtype)
        self.layers = nn.ModuleList(layers)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        pos = self.positions[positions] if self.sinusoidal else self.embed_positions(positions + 2)
        x = tokens + pos
        return self.layernorm_embedding(x) if hasattr(self, "layernorm_embedding") else x


class BartForConditionalGeneration(nn.Module):
    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        super().__init__()
        assert isinstance(cfg.arch_config, BartConfig), "a BART / Marian ModelConfig carries a BartConfig"
        bc = self.bart = cfg.arch_config
        self.config, self.dtype = cfg, dtype
        d = cfg.hidden_size
        act = activation(bc.activation, cfg.name)
        self.embed_scale = math.sqrt(d) if bc.scale_embedding else 1.0
        self.shared = nn.Embedding(cfg.vocab_size, d, dtype=dtype)
        self.encoder = _Stack([BartEncoderLayer(d, bc.encoder_heads, bc.encoder_ffn_dim, act, dtype)
                               for _ in range(bc.encoder_layers)], d, bc, bc.max_source_positions, dtype)
        self.decoder = _Stack([BartDecoderLayer(cfg, act, backend, dtype) for _ in range(cfg.num_layers)],
                              d, bc, cfg.max_position_embeddings, dtype)
        self.final_logits_bias = nn.Parameter(torch.zeros(1, cfg.vocab_size, dtype=dtype), requires_grad=False)
        self.lm_head = Linear(d, cfg.vocab_size, False, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.requires_grad_(False)

    # ---- EncoderDecoderLM ------------------------------------------------------------------------
    def encoder_len(self, encoder_input: torch.Tensor) -> int:
        return check_source_ids(encoder_input, self.config.vocab_size, self.bart.max_source_positions)

    def decoder_prompt_ids(self) -> list[int]:
        return [self.bart.decoder_start_token_id]

    @torch.inference_mode()
    def encode(self, encoder_inputs: list[torch.Tensor]) -> torch.Tensor:
        ids, real = pad_batch(encoder_inputs, self.bart.pad_token_id)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.encoder.embed(self.shared(ids) * self.embed_scale, positions)
        mask = real.view(real.shape[0], 1, 1, -1)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return flatten_real(x, real)

    @torch.inference_mode()
    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_kv(encoder_states) for layer in self.decoder.layers]

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices,
                cross_meta: AttentionMetadata) -> torch.Tensor:
        x = self.decoder.embed(self.shared(input_ids) * self.embed_scale, positions)
        for layer, kv_cache in zip(self.decoder.layers, kv_caches):
            x = layer(x, kv_cache, meta, cross_meta)
        x = x.index_select(0, logits_indices)
        logits = (self.lm_head(x) + self.final_logits_bias).float()
        return self._generation_rules(logits, positions.index_select(0, logits_indices))

    def _generation_rules(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The checkpoint's generation defaults that depend on nothing but the position: banned tokens get
        -inf; the row that picks the first generated token (position 0) allows only forced_bos_token_id."""
        bc = self.bart
        if bc.suppress_ids:
            logits[:, list(bc.suppress_ids)] = float("-inf")
        if bc.forced_bos_token_id is not None:
            first = positions == 0
            if bool(first.any()):
                logits[first] = torch.where(torch.arange(logits.shape[1], device=logits.device) == bc.forced_bos_token_id,
                                            0.0, float("-inf"))
        return logits
