"""The Llama family (Llama 2/3, SmolLM2, Mistral): pre-norm decoder, RMSNorm, RoPE, SwiGLU, GQA.

References: Touvron et al. 2023 (Llama), HF transformers `modeling_llama.py` (the parity oracle).
Q/K/V and gate/up are fused into single matmuls; the checkpoint's separate tensors are loaded into
shards of the fused weights (models/registry.py: LLAMA_PACKED; weights/load_into.py). Qwen2 is this
model with Q/K/V biases (qwen2.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.layer import Attention
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern
from scaleinfer.config import ModelConfig
from scaleinfer.layers.activation import silu_and_mul
from scaleinfer.layers.linear import Linear, MergedLinear
from scaleinfer.layers.norm import RMSNorm
from scaleinfer.layers.rotary import RotaryEmbedding, apply_rotary_
from scaleinfer.models.interface import DecoderLayerWeights, DecoderWeights

class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [q_size, kv_size, kv_size], cfg.attention_bias, dtype,
                                     shard_names=("q", "k", "v"))
        self.o_proj = Linear(q_size, cfg.hidden_size, False, dtype)
        # Mistral's config sets a sliding window for every layer: attention and KV follow it.
        pattern = AttentionPattern.sliding_window(cfg.sliding_window) if cfg.sliding_window else CAUSAL
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim ** -0.5, backend, pattern)

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                  # [n, (h + 2 * h_kv) * d]
        # Q and K sit side by side in the fused output: rotate them in one go, in place.
        qk = apply_rotary_(qkv[:, :(h + h_kv) * d].view(n, h + h_kv, d), cos, sin)
        q, k = qk.split([h, h_kv], dim=1)                       # [n, h, d], [n, h_kv, d] (views)
        v = qkv[:, (h + h_kv) * d:].view(n, h_kv, d)
        out = self.attn(q, k, v, kv_cache, meta)                # [n, h, d]
        return self.o_proj(out.view(n, h * d))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype,
                                         shard_names=("gate", "up"))
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, backend, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        for layer in self.layers:
            layer.self_attn.attn.set_rope(self.rotary.inv_freq)
        if cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices) -> torch.Tensor:
        x, residual = self.run_layers(self.embed(input_ids), None, positions, kv_caches, meta)
        return self.compute_head(x, residual, logits_indices)

    # The three parts of forward, for a pipeline stage (models/interface.py: PipelineStageModel).
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [num_tokens, hidden]

    def run_layers(self, x, residual, positions, kv_caches, meta: AttentionMetadata):
        """(x, residual) after the layers this model holds (a pipeline stage's own), one KV cache each."""
        cos, sin = self.rotary.lookup(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return x, residual

    def decode_layers(self) -> DecoderWeights:
        """The layers as typed weights (models/interface.py) for the runner's decode program."""
        first = self.layers[0]
        a = first.self_attn
        layers = tuple(DecoderLayerWeights(
            input_norm=layer.input_layernorm.weight, qkv=layer.self_attn.qkv_proj, o=layer.self_attn.o_proj,
            post_norm=layer.post_attention_layernorm.weight, gate_up=layer.mlp.gate_up_proj,
            down=layer.mlp.down_proj, attn=layer.self_attn.attn) for layer in self.layers)
        return DecoderWeights(a.num_heads, a.num_kv_heads, a.head_dim, first.input_layernorm.eps, layers,
                              embed=self.embed_tokens, rope=self.rotary.lookup, head=self.compute_head)

    def compute_head(self, x, residual, logits_indices) -> torch.Tensor:
        # Only the rows that need logits go through the final norm and the LM head.
        x = x.index_select(0, logits_indices)
        residual = residual.index_select(0, logits_indices)
        x, _ = self.norm(x, residual)
        return self.lm_head(x).float()
