"""AttentionBackend protocol and the table of implementations.

A backend writes the step's new K/V into the paged cache and computes attention for every query
through the block tables in AttentionMetadata. `sdpa` is the reference (the oracle for faster ones);
`cpu` is sdpa with fused CPU kernels for decode attention and K/V writes (the default on CPU).
"""
from __future__ import annotations

from typing import Protocol

import torch

from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.errors import ConfigError


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: torch.Tensor | None = None,  # the layer's RoPE inverse frequencies (positions=cache)
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]


def get_backend(name: str) -> AttentionBackend:
    from scaleinfer.attention.sdpa import CpuPagedBackend, SdpaBackend
    from scaleinfer.attention.kv_int8 import Int8KVSdpaBackend

    backends = {"sdpa": SdpaBackend, "cpu": CpuPagedBackend, "sdpa-int8kv": Int8KVSdpaBackend}
    if name not in backends:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {sorted(backends)}")
    return backends[name]()
