"""Gated activations: SwiGLU (Shazeer 2020) over a fused gate+up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleinfer.layers.fused import fused_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] -> [..., d]: silu(gate) * up."""
    ops = fused_ops(gate_up)
    if ops is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
