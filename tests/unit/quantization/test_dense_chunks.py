"""The reused slice buffer of the prefill-sized weight-only matmuls works inside and outside
torch.inference_mode, in either order (the engine runs under it, callers and tests may not)."""
from __future__ import annotations

import torch

from scaleinfer.quantization.dense_chunks import SliceBuffer, sliced_linear


def test_slice_buffer_made_in_inference_mode_is_usable_outside(monkeypatch):
    from scaleinfer.quantization import dense_chunks

    monkeypatch.setattr(dense_chunks, "SCRATCH", SliceBuffer())
    w = torch.randn(10, 64)
    x = torch.randn(5, 64)

    def rows(n0, n1, out):
        out.copy_(w[n0:n1])

    with torch.inference_mode():
        inside = sliced_linear(x, 10, None, rows)
    outside = sliced_linear(x, 10, None, rows)
    torch.testing.assert_close(inside, x @ w.t())
    torch.testing.assert_close(outside, x @ w.t())
