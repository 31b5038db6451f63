"""The protocol every causal LM family implements, so the runner never knows which family it runs,
and the typed per-layer weights a family exposes for the runner's decode program.

Weights are loaded from outside (weights/load_into.py, driven by the family's entry in models/registry.py)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from scaleinfer.attention.layer import Attention
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.layers.linear import Linear, MergedLinear


class CausalLM(Protocol):
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_logits] rows of the flat batch that need logits
    ) -> torch.Tensor: ...  # [num_logits, vocab_size] float32


class PipelineStageModel(CausalLM, Protocol):
    """A CausalLM whose forward is embed -> run_layers -> compute_head, so that a pipeline stage
    (distributed/stages.py) runs its part: the first embeds, every stage runs the layers it holds, the
    last computes the logits. Between stages travels the residual stream x + residual (one tensor: the
    next stage's first norm adds nothing more, so the result is the one process's, bit for bit)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...   # [n] -> [n, hidden]

    def run_layers(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                   kv_caches: list, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def compute_head(self, x: torch.Tensor, residual: torch.Tensor | None,
                     logits_indices: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One pre-norm decoder layer of the Llama shape, by reference (the model's own tensors and linears):

        x, residual = rms_norm(x + residual) * input_norm
        qkv = qkv(x); rotate q and k (RoPE, rotate-half); attn writes k, v and attends   (no Q/K norms)
        x, residual = rms_norm(o(attn) + residual) * post_norm
        x = down(silu(gate) * up), with gate_up = gate_up(x)

    A family whose layers compute exactly this exposes them through `decode_layers()`; any other
    family (Gemma 3: sandwich norms, Q/K norms, GeGLU) does not, and always runs its own forward."""

    input_norm: torch.Tensor    # [hidden] RMSNorm weight, multiplied as is
    qkv: MergedLinear           # [(h + 2 h_kv) d, hidden]: Q, K, V rows side by side (+ optional bias)
    o: Linear                   # [hidden, h d]
    post_norm: torch.Tensor     # [hidden]
    gate_up: MergedLinear       # [2 intermediate, hidden]: gate rows, then up rows
    down: Linear                # [hidden, intermediate]
    attn: Attention             # scale, pattern and backend of the layer's attention


@dataclass(frozen=True)
class DecoderWeights:
    """A whole Llama-shaped decoder for the runner's decode program: model-level dims, the layers in
    order, and the model's own embedding, RoPE table and head (so that the program computes exactly
    what the model's forward does around the layer loop)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float                  # of every RMSNorm
    layers: tuple[DecoderLayerWeights, ...]
    embed: Callable[[torch.Tensor], torch.Tensor]                                   # ids -> [n, hidden]
    rope: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]  # positions -> cos, sin
    head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]        # (x, residual, rows) -> logits
