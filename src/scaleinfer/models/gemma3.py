"""Gemma 3 (text): Llama-like decoder with sandwich norms, Q/K norms, GeGLU and 5:1 local/global attention.

Reference: Gemma Team 2025 (Gemma 3 technical report), HF transformers `modeling_gemma3.py` (the parity
oracle). Differences from Llama (llama.py):
- embeddings are scaled by sqrt(hidden_size) (the scale cast to the compute dtype first, as HF does);
- RMSNorm multiplies by (1 + w), computed in float32; checkpoints (HF naming) store the zero-centred w,
  the loader folds the +1 in once (registry norm_offset) so the forward is a plain F.rms_norm;
- four norms per layer: h = x + post_attn_norm(attn(input_norm(x))); out = h + post_ffw_norm(mlp(pre_ffw_norm(h)));
- q_norm / k_norm (RMSNorm over head_dim) before RoPE; attention scale query_pre_attn_scalar ** -0.5;
- GeGLU MLP (gelu, tanh approximation);
- "sliding_attention" layers attend a window of `sliding_window` keys (AttentionPattern.sliding_window,
  the engine applies it) and use RoPE base `rope_local_theta`; "full_attention" layers are causal with
  `rope_theta` (and `rope_scaling`, which HF applies to global layers only);
- optional final logit soft-capping cap * tanh(logits / cap).
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
from scaleinfer.errors import ConfigError, UnsupportedModelError
from scaleinfer.layers.linear import Linear, MergedLinear
from scaleinfer.layers.rotary import RotaryEmbedding, apply_rotary

SLIDING, FULL = "sliding_attention", "full_attention"
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")  # Gemma checkpoints name the tanh GELU all these ways


def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3's interleaving: every `pattern`-th layer global, the others sliding."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] -> [..., d]: gelu_tanh(gate) * up (GeGLU, Shazeer 2020)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh").mul_(up)


class GemmaRMSNorm(nn.Module):
    """RMSNorm with the (1 + w) scale in float32, output cast back to the input dtype (HF Gemma3RMSNorm).

    `weight` holds 1 + w (float32 whatever the model dtype); the loader adds the 1 (the family's
    norm_offset, models/registry.py).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, pattern: AttentionPattern):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [q_size, kv_size, kv_size], cfg.attention_bias, dtype,
                                     shard_names=("q", "k", "v"))
        self.o_proj = Linear(q_size, cfg.hidden_size, False, dtype)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, scale, backend, pattern=pattern)

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                  # [n, (h + 2 * h_kv) * d]
        q = apply_rotary(self.q_norm(qkv[:, :h * d].view(n, h, d)), cos, sin)
        k = apply_rotary(self.k_norm(qkv[:, h * d:(h + h_kv) * d].view(n, h_kv, d)), cos, sin)
        v = qkv[:, (h + h_kv) * d:].view(n, h_kv, d)
        out = self.attn(q, k, v, kv_cache, meta)                # [n, h, d]
        return self.o_proj(out.view(n, h * d))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype,
                                         shard_names=("gate", "up"))
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype, sliding: bool):
        super().__init__()
        self.sliding = sliding
        pattern = AttentionPattern.sliding_window(cfg.sliding_window) if sliding else CAUSAL
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, backend, dtype, pattern)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = Gemma3MLP(cfg, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos, sin, kv_cache, meta):
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        super().__init__()
        layer_types = cfg.layer_types or default_layer_types(cfg.num_layers)
        if len(layer_types) != cfg.num_layers or set(layer_types) - {SLIDING, FULL}:
            raise ConfigError(f"Gemma 3 needs one of {SLIDING!r} / {FULL!r} per layer ({cfg.num_layers}), "
                              f"got {layer_types!r}")
        if SLIDING in layer_types and not cfg.sliding_window:
            raise ConfigError("Gemma 3 sliding_attention layers need a sliding_window in the config")
        if cfg.hidden_activation not in _ACTIVATIONS:
            raise UnsupportedModelError(f"Gemma 3 with hidden_activation {cfg.hidden_activation!r} is not "
                                        f"supported; supported: gelu_pytorch_tanh")
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        # HF keeps sqrt(hidden) as a float32 tensor and casts it to the weight dtype before multiplying.
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32).to(dtype),
                             persistent=False)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, backend, dtype, t == SLIDING) for t in layer_types)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # One table per RoPE base actually used (each max_position x head_dim, cos and sin).
        self.rotary_global = (RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                              cfg.rope_scaling) if FULL in layer_types else None)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.rotary_local = (RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, local_theta)
                             if SLIDING in layer_types else None)
        for layer in self.layers:
            layer.self_attn.attn.set_rope((self.rotary_local if layer.sliding else self.rotary_global).inv_freq)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices) -> torch.Tensor:
        x, _ = self.run_layers(self.embed(input_ids), None, positions, kv_caches, meta)
        return self.compute_head(x, None, logits_indices)

    # The three parts of forward, for a pipeline stage (models/interface.py: PipelineStageModel). Gemma's
    # layers add their (post-normed) outputs to x themselves: the stream between stages is x, no residual.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale  # [num_tokens, hidden]

    def run_layers(self, x, residual, positions, kv_caches, meta: AttentionMetadata):
        """(x, None) after the layers this model holds (a pipeline stage's own), one KV cache each; each
        layer keeps its own kind (sliding or global) and RoPE table wherever the stage starts."""
        if residual is not None:
            x = x + residual
        rope = {}
        if self.rotary_global is not None:
            rope[False] = self.rotary_global.lookup(positions, x.dtype)
        if self.rotary_local is not None:
            rope[True] = self.rotary_local.lookup(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            cos, sin = rope[layer.sliding]
            x = layer(x, cos, sin, kv_cache, meta)
        return x, None

    def compute_head(self, x, residual, logits_indices) -> torch.Tensor:
        # Only the rows that need logits go through the final norm and the LM head.
        if residual is not None:
            x = x + residual
        x = self.norm(x.index_select(0, logits_indices))
        logits = self.lm_head(x).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
