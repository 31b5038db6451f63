"""GGUF 4-bit tensors go straight into the int4 group-32 layout (no float round trip) and stay exact:
the adopted int4 weight dequantizes to exactly what gguf's own dequantization gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from scaleinfer.config import EngineConfig
from scaleinfer.engine.loading import build_model
from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import Int4WeightOnly, dequantize_groupwise
from scaleinfer.weights.gguf import pack_int4_direct
from scaleinfer.weights.loader import open_checkpoint

from .tiny_gguf import write_tiny_gguf


def _direct(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    packed = [torch.from_numpy(np.array(p)) for p in pack_int4_direct(raw, qtype.name, shape)]
    return dequantize_groupwise(*packed)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_q4_0_q4_1_bit_exact(qtype):
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    raw = quants.quantize(w, qtype)
    want = torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32))
    assert torch.equal(_direct(raw, qtype, (8, 256)), want)


def test_q4_k_bit_exact():
    """Random Q4_K blocks (any bytes are a valid block once d and dmin are finite) over all 6-bit scales."""
    rng = np.random.default_rng(1)
    rows, k = 6, 512
    blocks = rng.integers(0, 256, size=(rows, k // 256, 144), dtype=np.uint8)
    d = rng.uniform(1e-4, 1e-2, size=(rows, k // 256, 2)).astype(np.float16)
    blocks[..., 0:4] = d.view(np.uint8).reshape(rows, k // 256, 4)
    raw = blocks.reshape(rows, -1)
    want = torch.from_numpy(quants.dequantize(raw, Q.Q4_K).astype(np.float32))
    got = _direct(raw, Q.Q4_K, (rows, k))
    assert torch.equal(got, want)


def test_other_types_have_no_direct_form():
    with pytest.raises(ValueError, match="Q6_K"):
        pack_int4_direct(np.zeros((1, 210), np.uint8), "Q6_K", (1, 256))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_engine_adopts_gguf_int4_exactly(tmp_path, qtype):
    """A llama GGUF (permuted Q/K rows, fused QKV and gate/up) at int4: every decoder linear is the
    file's own 4-bit values, equal to the dense load of the same file; other modes still re-quantize."""
    path = str(tmp_path / "m.gguf")
    write_tiny_gguf(path, qtype=qtype, hidden=64, ffn=128)
    dense = build_model(open_checkpoint(path), EngineConfig(model=path, quantization="none"))
    int4 = build_model(open_checkpoint(path), EngineConfig(model=path, quantization="int4"))
    dense_linears = {n: m for n, m in dense.named_modules() if isinstance(m, Linear)}
    checked = 0
    for name, layer in int4.named_modules():
        if not isinstance(layer, Linear) or name.endswith("lm_head"):
            continue
        assert isinstance(layer.quant_method, Int4WeightOnly) and layer.weight is None
        assert not layer.packed_shards
        assert torch.equal(layer.quant_method.dequantize(layer), dense_linears[name].weight), name
        checked += 1
    assert checked == 2 * 4  # qkv, o, gate_up, down per layer
    x = torch.randn(3, 64)
    layer = int4.layers[0].self_attn.qkv_proj
    assert torch.allclose(layer(x), x @ dense.layers[0].self_attn.qkv_proj.weight.T, atol=1e-4)


def test_mixed_shards_quantize_the_dense_ones(tmp_path):
    """A fused layer whose shards came partly packed: the dense shard is quantized, the packed kept."""
    layer = Linear(64, 32)
    layer.weight.data.copy_(torch.randn(32, 64))
    method = Int4WeightOnly()
    method.process_weights_after_loading(layer)
    reference = method.dequantize(layer)
    from scaleinfer.layers.linear import MergedLinear
    from scaleinfer.quantization.int4 import PackedInt4

    fused = MergedLinear(64, [32, 16])
    fused.load_shard(0, "weight", PackedInt4(layer.qweight, layer.weight_scale, layer.weight_min))
    fused.load_shard(1, "weight", torch.ones(16, 64))
    fused_method = Int4WeightOnly()
    fused_method.adopt_packed(fused)
    out = fused_method.dequantize(fused)
    assert torch.equal(out[:32], reference)
    assert torch.equal(out[32:], torch.ones(16, 64))
    with pytest.raises(ValueError, match="does not fit"):
        MergedLinear(64, [32, 16]).load_shard(1, "weight", PackedInt4(layer.qweight, layer.weight_scale,
                                                                      layer.weight_min))
