"""RMSNorm (Zhang & Sennrich 2019), optionally fused with the residual add."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.layers.fused import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.normalized_shape = (hidden_size,)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the residual stream is carried alongside (the
        fused kernel adds into `residual` in place: the stream is owned by the model's forward)."""
        ops = fused_ops(x)
        if ops is not None and x.dim() == 2 and (residual is None or residual.is_contiguous()):
            out, stream = ops.add_rms_norm(x, residual, self.weight, self.eps)
            return out, stream
        if residual is not None:
            x = x + residual
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps), x
