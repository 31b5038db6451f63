"""The kernels the decode program calls write into a caller's buffer when given one (`out=`): the same
values as a fresh result, the buffer itself returned, and a buffer of the wrong shape or dtype refused
with a clear error (decode_step.cpp keeps one buffer per intermediate of a step)."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.quantization.int4 import quantize_groupwise
from scaleinfer.kernels import cpu_kernels

ops = cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="low-bit CPU kernels not built")


def _cases():
    torch.manual_seed(0)
    m, n, k = 3, 96, 128
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    q4, s4, m4 = quantize_groupwise(w, 32)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n)
    gu = torch.randn(m, 2 * n)
    g = torch.rand(k)
    return {
        "f32_linear": (lambda out=None: ops.f32_linear(x, w, None, out=out), (m, n)),
        "int8_linear": (lambda out=None: ops.int8_linear(x, q8, s8, out=out), (m, n)),
        "int4_linear": (lambda out=None: ops.int4_linear(x, q4, s4, m4, 32, out=out), (m, n)),
        "int4_a8_linear": (lambda out=None: ops.int4_a8_linear(x, q4, s4.half(), m4.half(), out=out), (m, n)),
        "silu_and_mul": (lambda out=None: ops.silu_and_mul(gu, out=out), (m, n)),
        "add_rms_norm": (lambda out=None: ops.add_rms_norm(x, None, g, 1e-6, out=out)[0], (m, k)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_out_buffer_is_written_and_returned(name):
    fn, shape = _cases()[name]
    fresh = fn()
    buf = torch.full(shape, float("nan"))
    got = fn(out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, fresh)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        fn(out=torch.empty(shape[0], shape[1] + 1))
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        fn(out=torch.empty(shape, dtype=torch.float64))
