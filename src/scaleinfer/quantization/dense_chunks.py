"""Prefill-sized matmuls for weight-only methods: dequantize a slice of output rows into a small
reused fp32 buffer and multiply it with BLAS, slice by slice.

A whole-weight dequantize per call would allocate (and page-fault) a fresh fp32 copy of the weight;
slices of ROWS_PER_SLICE rows stay in L3 (9.4 MB at 576 inputs) and the buffer is reused, so a
weight-only layer runs near the fp32 matmul rate for large M while keeping exact fp32-activation
semantics. Slices are large on purpose: each one is two OpenMP parallel regions, and on a busy
2-core machine every region can wait a scheduler tick for a descheduled thread (seen with 256-row
slices: 850 regions per batched decode step, most of the time spent in the OpenMP barrier).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

ROWS_PER_SLICE = 4096


class SliceBuffer:
    """One fp32 [ROWS_PER_SLICE, in_features] scratch buffer per in_features size (engine thread only)."""

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, in_features: int) -> torch.Tensor:
        buf = self._buffers.get(in_features)
        # A buffer made under torch.inference_mode (the engine's steps) cannot be written outside it.
        if buf is None or (buf.is_inference() and not torch.is_inference_mode_enabled()):
            with torch.inference_mode(False):
                buf = self._buffers[in_features] = torch.empty(ROWS_PER_SLICE, in_features)
        return buf


SCRATCH = SliceBuffer()


def sliced_linear(x: torch.Tensor, out_features: int, bias: torch.Tensor | None,
                  dequantize_rows: Callable[[int, int, torch.Tensor], None]) -> torch.Tensor:
    """y = x W^T + b where dequantize_rows(n0, n1, out) writes W[n0:n1] (fp32) into out [n1 - n0, in]."""
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=x.dtype)
    buf = SCRATCH.get(k)
    for n0 in range(0, out_features, ROWS_PER_SLICE):
        n1 = min(n0 + ROWS_PER_SLICE, out_features)
        w = buf[:n1 - n0]
        dequantize_rows(n0, n1, w)
        torch.mm(x, w.t(), out=y[:, n0:n1])     # BLAS writes the column slice in place (ldc = out)
    if bias is not None:
        y += bias
    return y
