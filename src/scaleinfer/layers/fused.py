"""Which tensors may take the fused CPU kernels (kernels/csrc/cpu_ops.cpp) instead of torch ops.

The kernels exist for float32 on the CPU; everything else (GPU, bf16, no compiler) takes the torch
expressions they are tested against. SCALEINFER_FUSED_OPS=0 turns them off (to compare).
"""
from __future__ import annotations

import functools
import os

import torch

from scaleinfer.kernels import cpu_kernels


@functools.lru_cache(maxsize=1)
def _ops():
    if os.environ.get("SCALEINFER_FUSED_OPS", "1") == "0":
        return None
    ops = cpu_kernels()
    return ops if ops is not None and hasattr(ops, "add_rms_norm") else None


def fused_ops(x: torch.Tensor):
    """The kernel module when `x` (float32, CPU) can use it, else None."""
    if x.dtype is not torch.float32 or x.device.type != "cpu":
        return None
    return _ops()
