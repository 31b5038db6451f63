"""MPNet encoder over packed sequences: BERT-shaped layers plus a relative position bias (T5-style buckets)
shared by every layer, positions offset past the padding id, no token types. HF MPNetModel tensor names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.varlen import VarlenMetadata, varlen_attention
from scaleinfer.layers.onednn_linear import linear_act, linear_add
from scaleinfer.models.bert import ACTIVATIONS, BertEmbeddings, _Dense, _Output, feed_forward
from scaleinfer.models.encoder_config import EncoderConfig

MAX_DISTANCE = 128


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bucket of each (key - query) offset: half the buckets per direction, exact up to a quarter of the
    buckets, logarithmic beyond up to max_distance (as MPNet was trained)."""
    n = -relative_position
    half = num_buckets // 2
    ret = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return ret + torch.where(n < max_exact, n, large)


class _MPNetSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.q, self.k, self.v, self.o = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class _MPNetAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn = _MPNetSelfAttention(cfg)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class MPNetLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.act = cfg.hidden_act if cfg.hidden_act in ACTIVATIONS else None
        if self.act is None:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        self.attention = _MPNetAttention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _Output(cfg)
        self.qkv: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        a = self.attention.attn
        self.qkv = torch.cat([a.q.weight, a.k.weight, a.v.weight]).detach()
        self.qkv_bias = torch.cat([a.q.bias, a.k.bias, a.v.bias]).detach()

    def forward(self, x: torch.Tensor, meta: VarlenMetadata, bias) -> torch.Tensor:
        a = self.attention.attn
        if self.qkv is None:
            self.fuse()
        qkv = linear_act(x, self.qkv, self.qkv_bias).view(x.shape[0], 3, self.num_heads, self.head_dim)
        attn = varlen_attention(qkv, meta, bias)
        x = self.attention.LayerNorm(linear_add(attn, a.o.weight, a.o.bias, x))
        return feed_forward(self, x)


class _MPNetEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(MPNetLayer(cfg) for _ in range(cfg.num_layers))
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)


class MPNetModel(nn.Module):
    """The MPNet backbone: packed token ids -> packed final hidden states."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)    # type_vocab_size 0: word + position + LayerNorm
        self.encoder = _MPNetEncoder(cfg)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """[heads, L, L] additive bias from the bucket of each (key - query) offset."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets)
        return self.encoder.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None,
                meta: VarlenMetadata) -> torch.Tensor:
        x = self.embeddings(input_ids, positions + self.config.position_offset, None)
        bias = self.position_bias(meta.max_len, input_ids.device).to(x.dtype)
        masks = meta.group_masks(bias)        # every layer shares the bias: fold it into the masks once
        for layer in self.encoder.layer:
            x = layer(x, meta, masks)
        return x

    def fuse(self) -> None:
        for layer in self.encoder.layer:
            layer.fuse()
