"""T5 (Raffel et al. 2019; v1.0 and v1.1 / flan-t5): a pre-norm (RMS norm, no bias anywhere) encoder-decoder
whose attention has no 1/sqrt(d) scale and no position embeddings: each side's first layer owns a
relative-position bias (log-spaced buckets of key - query; bidirectional in the encoder, causal in the
decoder) that every layer of that side adds to its scores. Cross-attention has no bias. The LM head is
tied to the shared embedding or separate (v1.1 as HF 4 saved it); v1.0 scales the decoder output by
d_model ** -0.5 first (scale_decoder_outputs).

Implements models/encoder_decoder.py: the encoder runs once per request (batched, padded); each decoder
layer's cross K/V are computed once and read from the paged cache. Decoder self-attention goes through
attention/position_bias.py (paged, with the bias). Reference: HF transformers `modeling_t5.py`; module
names follow the HF checkpoints (encoder.block.N.layer.M...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.cross import CrossAttention
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.attention.position_bias import biased_paged_attention
from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError
from scaleinfer.layers.linear import Linear
from scaleinfer.models.seq2seq_common import activation, check_source_ids, flatten_real, pad_batch


@dataclass(frozen=True)
class T5Config:
    """What ModelConfig (the decoder's dims) does not say about a T5 model (ModelConfig.arch_config)."""

    encoder_layers: int
    d_ff: int
    gated: bool                         # v1.1: wi_0 (activated) * wi_1
    activation: str
    num_buckets: int
    max_distance: int
    eps: float
    decoder_start_token_id: int
    pad_token_id: int
    scale_decoder_outputs: bool
    """The decoder output is scaled by d_model ** -0.5 before the LM head (T5 v1.0; not v1.1 / flan-t5)."""


def read_t5_config(cfg: dict, cfg_file: str) -> ModelConfig:
    proj = cfg.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    if act == "gelu" and gated:
        act = "gelu_new"   # HF: "gated-gelu" means the tanh approximation
    activation(act, cfg_file)
    if cfg.get("is_decoder_only") or not cfg.get("is_encoder_decoder", True):
        raise UnsupportedModelError(f"{cfg_file}: not an encoder-decoder T5 (encoder-only / decoder-only T5 "
                                    f"checkpoints are not supported)")
    heads, eos = cfg["num_heads"], cfg.get("eos_token_id", 1)
    arch = T5Config(encoder_layers=cfg["num_layers"], d_ff=cfg["d_ff"], gated=gated, activation=act,
                    num_buckets=cfg.get("relative_attention_num_buckets", 32),
                    max_distance=cfg.get("relative_attention_max_distance", 128),
                    eps=cfg.get("layer_norm_epsilon", 1e-6),
                    decoder_start_token_id=cfg.get("decoder_start_token_id", cfg.get("pad_token_id", 0)),
                    pad_token_id=cfg.get("pad_token_id", 0),
                    # HF 4 configs say it as tie_word_embeddings (false in v1.1); HF 5 writes it out
                    scale_decoder_outputs=cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True)))
    return ModelConfig(
        architecture="t5", vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], intermediate_size=cfg["d_ff"],
        num_layers=cfg.get("num_decoder_layers") or cfg["num_layers"], num_heads=heads, num_kv_heads=heads,
        head_dim=cfg["d_kv"], max_position_embeddings=cfg.get("n_positions") or 1 << 20,
        rms_norm_eps=arch.eps, tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos), name=cfg.get("_name_or_path", ""),
        arch_config=arch)


def relative_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact below num_buckets / 4 (or / 2 one-sided),
    log-spaced up to max_distance, the last bucket beyond."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < exact, rel, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, in float32 (HF T5LayerNorm)."""

    def __init__(self, d: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def _attention_module(d: int, inner: int, buckets: int | None, heads: int, dtype: torch.dtype) -> nn.Module:
    m = nn.Module()
    m.q, m.k, m.v = (Linear(d, inner, False, dtype) for _ in range(3))
    m.o = Linear(inner, d, False, dtype)
    if buckets is not None:
        m.relative_attention_bias = nn.Embedding(buckets, heads, dtype=dtype)
    return m


def _sublayer(attr: str, module: nn.Module, d: int, eps: float, dtype: torch.dtype) -> nn.Module:
    s = nn.Module()
    setattr(s, attr, module)
    s.layer_norm = T5LayerNorm(d, eps, dtype)
    return s


def _ff(d: int, tc: T5Config, dtype: torch.dtype) -> nn.Module:
    m = nn.Module()
    if tc.gated:
        m.wi_0, m.wi_1 = Linear(d, tc.d_ff, False, dtype), Linear(d, tc.d_ff, False, dtype)
    else:
        m.wi = Linear(d, tc.d_ff, False, dtype)
    m.wo = Linear(tc.d_ff, d, False, dtype)
    return m


class T5ForConditionalGeneration(nn.Module):
    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        super().__init__()
        assert isinstance(cfg.arch_config, T5Config), "a T5 ModelConfig carries a T5Config"
        tc = self.t5 = cfg.arch_config
        self.config, self.dtype = cfg, dtype
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.heads, self.head_dim, self.act = h, hd, activation(tc.activation, cfg.name)
        self.shared = nn.Embedding(cfg.vocab_size, d, dtype=dtype)
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.block = nn.ModuleList()
        for i in range(tc.encoder_layers):
            b = nn.Module()
            attn = _attention_module(d, h * hd, tc.num_buckets if i == 0 else None, h, dtype)
            b.layer = nn.ModuleList([_sublayer("SelfAttention", attn, d, tc.eps, dtype),
                                     _sublayer("DenseReluDense", _ff(d, tc, dtype), d, tc.eps, dtype)])
            self.encoder.block.append(b)
        self.encoder.final_layer_norm = T5LayerNorm(d, tc.eps, dtype)
        self.decoder.block = nn.ModuleList()
        for i in range(cfg.num_layers):
            b = nn.Module()
            attn = _attention_module(d, h * hd, tc.num_buckets if i == 0 else None, h, dtype)
            cross = _attention_module(d, h * hd, None, h, dtype)
            cross.attn = CrossAttention(h, h, hd, 1.0, backend)   # T5 does not scale scores
            b.layer = nn.ModuleList([_sublayer("SelfAttention", attn, d, tc.eps, dtype),
                                     _sublayer("EncDecAttention", cross, d, tc.eps, dtype),
                                     _sublayer("DenseReluDense", _ff(d, tc, dtype), d, tc.eps, dtype)])
            self.decoder.block.append(b)
        self.decoder.final_layer_norm = T5LayerNorm(d, tc.eps, dtype)
        self.lm_head = Linear(d, cfg.vocab_size, False, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.requires_grad_(False)

    def _feed_forward(self, sub: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ff, h = sub.DenseReluDense, sub.layer_norm(x)
        inner = self.act(ff.wi_0(h)) * ff.wi_1(h) if self.t5.gated else self.act(ff.wi(h))
        return x + ff.wo(inner)

    def _bias(self, table: nn.Embedding, bidirectional: bool):
        def bias(rel: torch.Tensor) -> torch.Tensor:   # [..., q, k] -> [..., heads, q, k]
            b = table(relative_bucket(rel, bidirectional, self.t5.num_buckets, self.t5.max_distance))
            return b.movedim(-1, -3)
        return bias

    # ---- EncoderDecoderLM ------------------------------------------------------------------------
    def encoder_len(self, encoder_input: torch.Tensor) -> int:
        return check_source_ids(encoder_input, self.config.vocab_size, None)

    def decoder_prompt_ids(self) -> list[int]:
        return [self.t5.decoder_start_token_id]

    @torch.inference_mode()
    def encode(self, encoder_inputs: list[torch.Tensor]) -> torch.Tensor:
        ids, real = pad_batch(encoder_inputs, self.t5.pad_token_id)
        b, t = ids.shape
        h, hd = self.heads, self.head_dim
        pos = torch.arange(t, device=ids.device)
        bias_fn = self._bias(self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias, True)
        bias = bias_fn(pos.view(1, t) - pos.view(t, 1)).unsqueeze(0).float()          # [1, h, t, t]
        bias = bias.masked_fill(~real.view(b, 1, 1, t), float("-inf"))
        x = self.shared(ids)
        for block in self.encoder.block:
            sub = block.layer[0]
            a, y = sub.SelfAttention, sub.layer_norm(x)
            q, k, v = (p(y).view(b, t, h, hd).transpose(1, 2) for p in (a.q, a.k, a.v))
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) + bias
            out = torch.matmul(scores.softmax(-1), v.float()).to(x.dtype)
            x = x + a.o(out.transpose(1, 2).reshape(b, t, h * hd))
            x = self._feed_forward(block.layer[1], x)
        return flatten_real(self.encoder.final_layer_norm(x), real)

    @torch.inference_mode()
    def cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = encoder_states.shape[0]
        out = []
        for block in self.decoder.block:
            a = block.layer[1].EncDecAttention
            out.append((a.k(encoder_states).view(n, self.heads, self.head_dim),
                        a.v(encoder_states).view(n, self.heads, self.head_dim)))
        return out

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices,
                cross_meta: AttentionMetadata) -> torch.Tensor:
        n, h, hd = input_ids.shape[0], self.heads, self.head_dim
        bias = self._bias(self.decoder.block[0].layer[0].SelfAttention.relative_attention_bias, False)
        x = self.shared(input_ids)
        for block, kv_cache in zip(self.decoder.block, kv_caches):
            sub = block.layer[0]
            a, y = sub.SelfAttention, sub.layer_norm(x)
            q, k, v = (p(y).view(n, h, hd) for p in (a.q, a.k, a.v))
            x = x + a.o(biased_paged_attention(q, k, v, kv_cache, meta, positions, 1.0, bias).view(n, h * hd))
            sub = block.layer[1]
            c = sub.EncDecAttention
            q = c.q(sub.layer_norm(x)).view(n, h, hd)
            x = x + c.o(c.attn(q, kv_cache, cross_meta).view(n, h * hd))
            x = self._feed_forward(block.layer[2], x)
        x = self.decoder.final_layer_norm(x.index_select(0, logits_indices))
        if self.t5.scale_decoder_outputs:
            x = x * self.config.hidden_size ** -0.5
        return self.lm_head(x).float()
