"""w4a8 for prefill-sized inputs (csrc/a8_gemm.cpp): the GEMM against the mode's reference (activations
quantized per block of 32 times the dequantized int4 weights, int4.py: a8_reference) for row counts from 1
to 600 and odd shapes, on every GEMM path this CPU has (AMX-INT8 tiles, 512-bit VNNI); the AMX path equal
to the VNNI path bit for bit (both compute each group's integer dot exactly and apply the same float
steps); and CPUs without 512-bit VNNI keeping the int4 weight-only prefill. The same GEMM for block-32 int8
weights (int8_a8_gemm) against W8A8Block32's reference."""
from __future__ import annotations

import contextlib

import pytest
import torch

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import W4A8, W4A8_MAX_ROWS, Int4WeightOnly, w4a8_kernel_paths
from scaleinfer.quantization.int8 import A8_BLOCK_GEMV_ROWS, W8A8Block32
from scaleinfer.kernels import cpu_kernels

from .kernel_paths import forced_isa

ops = cpu_kernels()
GEMM_PATHS = ["vnni512", "amx-int8"]


@contextlib.contextmanager
def gemm_path_forced(name: str):
    """Run the w4a8 prefill GEMM on `name` (amx-int8 / vnni512), then restore the previous choice."""
    prev = ops.set_a8_gemm_path(name)
    try:
        yield name
    finally:
        ops.set_a8_gemm_path(prev)


def _gemm_paths() -> list[str]:
    out = []
    for p in GEMM_PATHS if ops is not None else []:
        try:
            ops.set_a8_gemm_path(ops.set_a8_gemm_path(p))
            out.append(p)
        except RuntimeError:
            pass
    return out or ["absent"]


@pytest.fixture(params=_gemm_paths())
def gemm_path(request):
    if request.param == "absent":
        pytest.skip("no w4a8 GEMM path on this CPU (needs AVX512-VNNI) or no C++ kernels")
    with gemm_path_forced(request.param) as name:
        yield name


def _w4a8_layer(out_f: int, in_f: int, bias: bool = True, method=W4A8) -> Linear:
    g = torch.Generator().manual_seed(0)
    layer = Linear(in_f, out_f, bias=bias)
    layer.weight.data.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
    if bias:
        layer.bias.data.copy_(torch.randn(out_f, generator=g))
    m = method()
    m.process_weights_after_loading(layer)
    layer.quant_method = m
    return layer


def _x(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0.0                                   # an all-zero block (scale 0)
    x[-1, -32:] *= 50.0                               # an outlier block
    return x


# 96 and 224 inputs: 3 and 7 groups; 33, 37, 70 output rows: partial 32-row weight blocks; rows: one
# input block, partial blocks, several blocks, up to 600.
@pytest.mark.parametrize("shape", [(64, 96), (40, 224), (33, 576), (37, 736), (70, 1536)])
@pytest.mark.parametrize("rows", [1, W4A8_MAX_ROWS, W4A8_MAX_ROWS + 1, 32, 33, 130, 600])
def test_w4a8_matches_its_reference_at_every_row_count(gemm_path, shape, rows):
    _assert_matches_reference(_w4a8_layer(*shape), _x(rows, shape[1]))


def _assert_matches_reference(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for x within 1e-5 (relative to its largest value) of its method's reference."""
    ref = layer.quant_method.reference(layer, x)
    y = layer(x)
    assert y.shape == (x.shape[0], layer.out_features)
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5
    return y


@pytest.mark.parametrize("shape", [(33, 576), (70, 1536), (576, 576)])
@pytest.mark.parametrize("rows", [1, 17, 100, 512])
def test_amx_equals_vnni_bit_for_bit(shape, rows):
    paths = _gemm_paths()
    if "amx-int8" not in paths:
        reason = ops.amx_status() if ops is not None else "no C++ kernels"
        pytest.skip(f"AMX-INT8 not usable here ({reason})")
    layer = _w4a8_layer(*shape, bias=False)
    x = _x(rows, shape[1], seed=rows)
    args = (x, layer.qweight, layer.weight_scale, layer.weight_min)
    with gemm_path_forced("vnni512"):
        y_vnni = ops.int4_a8_gemm(*args)
    with gemm_path_forced("amx-int8"):
        y_amx = ops.int4_a8_gemm(*args)
    assert torch.equal(y_amx, y_vnni)


def test_gemm_and_decode_kernel_compute_the_same_function(gemm_path):
    """A prompt's rows through the GEMM equal the same rows one at a time through the decode kernel."""
    layer = _w4a8_layer(96, 576)
    x = _x(W4A8_MAX_ROWS + 8, 576)
    y_gemm = layer(x)
    y_rows = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])
    assert float((y_gemm - y_rows).abs().max() / y_rows.abs().max()) < 1e-5


def test_gemm_writes_into_out_and_checks_shapes():
    if _gemm_paths() == ["absent"]:
        pytest.skip("no w4a8 GEMM path on this CPU")
    layer = _w4a8_layer(40, 224, bias=False)
    x = _x(50, 224)
    out = torch.empty(50, 40)
    y = ops.int4_a8_gemm(x, layer.qweight, layer.weight_scale, layer.weight_min, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="features"):
        ops.int4_a8_gemm(_x(50, 256), layer.qweight, layer.weight_scale, layer.weight_min)


def test_without_512_bit_vnni_prefill_stays_int4_weight_only():
    if ops is None:
        pytest.skip("CPU kernels not built")
    ctx = forced_isa("avx2")   # skips where the CPU has no AVX2
    ctx.__enter__()
    try:
        assert ops.a8_gemm_path() == "none"
        assert w4a8_kernel_paths()["prefill"].startswith("int4 weight-only")
        layer = _w4a8_layer(128, 512, bias=False)
        x = _x(W4A8_MAX_ROWS + 1, 512)
        wo = Linear(512, 128, bias=False)
        wo.weight = None
        wo.quant_method = Int4WeightOnly()
        wo.register_buffer("qweight", layer.qweight)
        wo.register_buffer("weight_scale", layer.weight_scale.float())
        wo.register_buffer("weight_min", layer.weight_min.float())
        assert torch.equal(layer(x), wo(x))
    finally:
        ctx.__exit__(None, None, None)


def test_kernel_paths_name_what_runs():
    paths = w4a8_kernel_paths()
    assert set(paths) >= {"decode", "prefill"}
    if ops is not None:
        assert paths["decode"] == ops.isa()
        assert ops.amx_status() == "on" or ops.amx_status().startswith("off: ")


def _block32_layer(out_f: int, in_f: int, bias: bool = True) -> Linear:
    return _w4a8_layer(out_f, in_f, bias, method=W8A8Block32)


# Block-32 int8 weights (auto's 6- and 8-bit tensors, w4a8's LM head) through the same GEMM: bytes q + 128
# and a minimum of -128 * scale per group (csrc/a8_gemm.cpp: pack_block_int8).
@pytest.mark.parametrize("shape", [(64, 96), (33, 576), (70, 1536)])
@pytest.mark.parametrize("rows", [A8_BLOCK_GEMV_ROWS + 1, 33, 130])
def test_int8_block32_gemm_matches_its_reference(gemm_path, shape, rows):
    layer = _block32_layer(*shape)
    x = _x(rows, shape[1])
    y = _assert_matches_reference(layer, x)
    y_rows = torch.cat([layer(x[i:i + 1]) for i in range(rows)])   # the decode GEMV, row by row
    assert float((y - y_rows).abs().max() / y_rows.abs().max()) < 1e-5


def test_int8_block32_amx_equals_vnni_and_writes_into_out():
    paths = _gemm_paths()
    if paths == ["absent"]:
        pytest.skip("no a8 GEMM path on this CPU")
    layer = _block32_layer(70, 1536, bias=False)
    x = _x(100, 1536)
    out = torch.empty(100, 70)
    with gemm_path_forced("vnni512"):
        y_vnni = ops.int8_a8_gemm(x, layer.qweight, layer.weight_scale, out=out)
    assert y_vnni.data_ptr() == out.data_ptr()
    if "amx-int8" in paths:
        with gemm_path_forced("amx-int8"):
            assert torch.equal(ops.int8_a8_gemm(x, layer.qweight, layer.weight_scale), y_vnni)
    with pytest.raises(RuntimeError, match="features"):
        ops.int8_a8_gemm(_x(50, 256), layer.qweight, layer.weight_scale)
