"""BERT-family encoders over packed sequences: BERT / MiniLM (absolute positions, token types) and
RoBERTa / XLM-RoBERTa (positions offset past the padding id), with their HF tensor names.

Parameter names follow HF's BertModel so a checkpoint loads by name (weights/encoder.py strips a head's
"bert." prefix). Inputs are packed: [T] token ids of B sequences back to back, their lengths in a
VarlenMetadata (attention/varlen.py); the output is [T, hidden] final states. Heads: models/encoder_heads.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.varlen import VarlenMetadata, varlen_attention
from scaleinfer.layers.onednn_linear import linear_act, linear_add
from scaleinfer.models.encoder_config import EncoderConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class _SelfOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _SelfOutput(cfg)


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class _Output(_Dense):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.act = cfg.hidden_act if cfg.hidden_act in ACTIVATIONS else None
        if self.act is None:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        self.attention = _Attention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _Output(cfg)
        self.qkv: torch.Tensor | None = None   # fused [3h, h] weight, built by fuse() after loading
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One [3h, h] matmul for Q, K and V (after the weights are loaded)."""
        s = self.attention.self
        self.qkv = torch.cat([s.query.weight, s.key.weight, s.value.weight]).detach()
        self.qkv_bias = torch.cat([s.query.bias, s.key.bias, s.value.bias]).detach()

    def forward(self, x: torch.Tensor, meta: VarlenMetadata, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.qkv is None:
            self.fuse()
        qkv = linear_act(x, self.qkv, self.qkv_bias).view(x.shape[0], 3, self.num_heads, self.head_dim)
        attn = varlen_attention(qkv, meta, bias)
        out = self.attention.output
        x = out.LayerNorm(linear_add(attn, out.dense.weight, out.dense.bias, x))
        return feed_forward(self, x)


def feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x + W2 act(W1 x)): the activation and the residual add fused into the matmuls."""
    h = linear_act(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.act)
    return layer.output.LayerNorm(linear_add(h, layer.output.dense.weight, layer.output.dense.bias, x))


class _Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class BertModel(nn.Module):
    """The encoder backbone: packed token ids -> packed final hidden states."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None,
                meta: VarlenMetadata) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions + self.config.position_offset, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x

    def fuse(self) -> None:
        for layer in self.encoder.layer:
            layer.fuse()
