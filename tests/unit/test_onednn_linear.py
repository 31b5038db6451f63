"""The oneDNN fused-epilogue linear (layers/onednn_linear.py) equals F.linear + the eager epilogue."""
import pytest
import torch
import torch.nn.functional as F

from scaleinfer.layers import onednn_linear as ol

EAGER = {None: lambda x: x, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@pytest.mark.parametrize("act", list(EAGER))
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_linear_act_matches_eager(act, rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 96, generator=g), torch.randn(160, 96, generator=g), torch.randn(160, generator=g)
    ref = EAGER[act](F.linear(x, w, b))
    torch.testing.assert_close(ol.linear_act(x, w, b, act), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ol.linear_act(x, w, None, act), EAGER[act](F.linear(x, w)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_add_matches_eager(dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(50, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    r = torch.randn(50, 32, generator=g)
    x, w, b, r = (t.to(dtype) for t in (x, w, b, r))
    ref = (F.linear(x.float(), w.float(), b.float()) + r.float())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.25)
    torch.testing.assert_close(ol.linear_add(x, w, b, r).float(), ref, **tol)


def test_uses_onednn_on_cpu_and_falls_back_when_tracing():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert ol._onednn(x, w) == (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    assert not ol._onednn(x.half(), w.half())           # float16: eager path
    traced = torch.jit.trace(lambda t: ol.linear_act(t, w, None, "gelu"), x)
    assert "mkldnn" not in str(traced.graph)            # ONNX export (TorchScript tracing) sees eager ops
    torch.testing.assert_close(traced(x), F.gelu(F.linear(x, w)))


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="unsupported activation"):
        ol.linear_act(torch.randn(2, 4), torch.randn(3, 4), None, "swish")
