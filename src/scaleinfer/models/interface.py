"""The protocol every causal LM family implements, so the runner never knows which family it runs.

Weights are loaded from outside (weights/load_into.py, driven by the family's entry in models/registry.py)."""
from __future__ import annotations

from typing import Protocol

import torch

from scaleinfer.attention.metadata import AttentionMetadata


class CausalLM(Protocol):
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_logits] rows of the flat batch that need logits
    ) -> torch.Tensor: ...  # [num_logits, vocab_size] float32
