"""Model shapes for the planner: the numbers that decide memory and traffic (layers, widths, heads,
vocabulary, experts), parameter counts, and the byte widths of weight / KV formats.

A shape comes from the named table (published HF config.json values), from an HF config.json of any
decoder (the planner may plan models the engine cannot run, e.g. Mixtral), or from a ModelConfig.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from scaleinfer.config import ModelConfig
from scaleinfer.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1
    """Experts per MoE layer (1: a dense MLP)."""
    experts_per_token: int = 1

    def attention_params(self) -> int:
        """Q, K, V and O weights of one layer."""
        q = self.hidden_size * self.num_heads * self.head_dim
        return 2 * q + 2 * self.hidden_size * self.num_kv_heads * self.head_dim

    def mlp_params(self, experts: float | None = None) -> float:
        """Gate, up and down weights of one layer, over `experts` experts (default: all of them)."""
        return 3 * self.hidden_size * self.intermediate_size * (self.num_experts if experts is None else experts)

    def layer_params(self) -> float:
        return self.attention_params() + self.mlp_params()

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """The LM head's own weights (0 when it is the embedding)."""
        return 0 if self.tie_word_embeddings else self.embedding_params()

    def total_params(self) -> float:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.num_layers * self.layer_params() + self.embedding_params() + self.head_params() + norms

    def active_experts(self, tokens: int) -> float:
        """Expected distinct experts a step of `tokens` tokens reads per layer (uniform routing)."""
        if self.num_experts == 1:
            return 1.0
        miss = (1 - self.experts_per_token / self.num_experts) ** max(tokens, 1)
        return self.num_experts * (1 - miss)


@dataclass(frozen=True)
class WeightFormat:
    name: str
    body: float
    """Bytes per decoder linear weight (scales included)."""
    head: float
    """Bytes per LM head weight (and the embedding table's, which decode reads one row of)."""


# name -> bytes per weight. The CPU modes are this engine's (quantization/table.py): int4 groups of 32
# carry an fp16 scale and an fp16 min (0.5 + 4/32), w4a8's head is int8 per block of 32 (1 + 2/32, Q8_0's
# layout); what the plan leaves out: Q4_K_M's Q6_K tensors, which the engine keeps at int8.
# fp8 / int8 / awq are the GPU engines' usual layouts: the LM head stays 16-bit.
WEIGHT_FORMATS = {f.name: f for f in (
    WeightFormat("fp32", 4.0, 4.0), WeightFormat("bf16", 2.0, 2.0), WeightFormat("fp16", 2.0, 2.0),
    WeightFormat("fp8", 1.0, 2.0), WeightFormat("int8", 1.0, 1.0), WeightFormat("w8a8", 1.0, 1.0),
    WeightFormat("int4", 0.625, 1.0), WeightFormat("w4a8", 0.625, 1.0625),
    WeightFormat("awq", 0.5 + 2 / 128, 2.0),
)}
KV_FORMATS = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
"""KV cache bytes per element (int8 adds one fp32 scale per token and head, see kv_bytes_per_token)."""
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def kv_bytes_per_token(shape: ModelShape, kv_format: str, layers: float | None = None,
                       kv_heads: int | None = None) -> float:
    """K and V bytes one token occupies: 2 x layers x kv_heads x head_dim x bytes (+ int8's scales)."""
    layers = shape.num_layers if layers is None else layers
    kv_heads = shape.num_kv_heads if kv_heads is None else kv_heads
    per_head = shape.head_dim * KV_FORMATS[kv_format] + (4 if kv_format == "int8" else 0)
    return 2 * layers * kv_heads * per_head


def _shape(name, layers, hidden, heads, kv_heads, inter, vocab, tied=False, experts=1, top_k=1, head_dim=128):
    return ModelShape(name, layers, hidden, heads, kv_heads, head_dim, inter, vocab, tied, experts, top_k)


# Values of each model's published HF config.json.
NAMED_SHAPES = {s.name.lower(): s for s in (
    _shape("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256),
    _shape("Llama-3-70B", 80, 8192, 64, 8, 28672, 128256),
    _shape("Qwen2.5-0.5B", 24, 896, 14, 2, 4864, 151936, tied=True, head_dim=64),
    _shape("Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, 151936, tied=True),
    _shape("Qwen2.5-72B", 80, 8192, 64, 8, 29568, 152064),
    _shape("Mixtral-8x7B", 32, 4096, 32, 8, 14336, 32000, experts=8, top_k=2),
)}


def named_shape(name: str) -> ModelShape | None:
    return NAMED_SHAPES.get(name.lower())


def from_model_config(cfg: ModelConfig) -> ModelShape:
    return ModelShape(cfg.name or cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads,
                      cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
                      cfg.tie_word_embeddings)


def from_hf_config(path: str) -> ModelShape:
    """The shape an HF config.json describes (a multimodal config's text_config when it has one)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model config {path!r} ({exc}); pass an HF config.json, a catalog "
                          f"name or a named shape") from None
    cfg = cfg.get("text_config", cfg)
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            name=str(cfg.get("_name_or_path") or path), num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden, num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 1))
    except KeyError as exc:
        raise ConfigError(f"{path} lacks {exc.args[0]!r}, which the planner needs; is it a decoder's config.json?") \
            from None
