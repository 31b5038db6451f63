"""Linear layers with a fused epilogue through oneDNN (CPU encoders): y = act(x W^T + b) or x W^T + b + r.

On CPU, F.linear in float32 goes to MKL's sgemm. On AMD EPYC (AVX-512, no Intel dispatch) oneDNN's
matmul is faster on the encoders' shapes ([T, 384] x [384, 1536] and the like: 136-175 -> 178-213
GFLOPS, 2 threads), and it applies GELU or the residual add while the output tile is still in cache
instead of another pass over [T, 4h] / [T, h]. torch exposes that matmul as mkldnn._linear_pointwise
(what inductor's CPU backend calls); where it is missing (other devices, torch builds without oneDNN,
float16) the same function falls back to F.linear plus the epilogue in eager ops. Results agree with
the eager ops to fp32 rounding (tests/unit/test_onednn_linear.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ALGORITHMS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
               "relu": ("relu", ""), None: ("none", "")}
_EAGER = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
          "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, None: lambda x: x}

enabled = True
"""Module switch (tests turn it off to compare against the eager path)."""


def _onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and w.dtype == x.dtype
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())   # ONNX export traces eager ops


def linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str | None = None) -> torch.Tensor:
    """act(x W^T + b), act one of gelu (erf), gelu_new / gelu_pytorch_tanh (tanh), relu, None."""
    if act not in _ALGORITHMS:
        raise ValueError(f"unsupported activation {act!r}")
    if _onednn(x, w):
        attr, algorithm = _ALGORITHMS[act]
        return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algorithm)
    return _EAGER[act](F.linear(x, w, b))


def linear_add(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """x W^T + b + residual (residual of the output's shape)."""
    if _onednn(x, w) and residual.dtype == x.dtype and residual.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")
    return F.linear(x, w, b) + residual
