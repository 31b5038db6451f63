"""RowSplit (quantization/mixed.py): a fused layer whose shards are stored by different methods, as the
int4 modes store a QKV layer (int4 q/k, int8 v)."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.layers.linear import Linear, MergedLinear
from scaleinfer.quantization.base import apply_quantization
from scaleinfer.quantization.int4 import Int4WeightOnly, PackedInt4, W4A8, quantize_groupwise
from scaleinfer.quantization.int8 import Int8WeightOnly
from scaleinfer.quantization.mixed import RowSplit, int8_bands


def _qkv(bias: bool = True, names=("q", "k", "v")) -> MergedLinear:
    torch.manual_seed(0)
    layer = MergedLinear(64, [32, 16, 16], bias=bias, shard_names=names)
    layer.weight.data.copy_(torch.randn(64, 64) * 0.1)
    if bias:
        layer.bias.data.copy_(torch.randn(64))
    return layer


def test_bands_group_consecutive_shards_by_precision():
    assert int8_bands(_qkv()) == [([0, 1], False), ([2], True)]
    assert int8_bands(_qkv(names=("q", "v", "k"))) == [([0], False), ([1], True), ([2], False)]
    assert int8_bands(MergedLinear(64, [32, 32], shard_names=("gate", "up"))) is None
    assert int8_bands(Linear(64, 32)) is None
    stored = _qkv()   # a v that arrived as a GGUF Q4 tensor is the checkpoint's own int4: it stays int4
    stored.load_shard(2, "weight", PackedInt4(*quantize_groupwise(torch.randn(16, 64), 32)))
    assert int8_bands(stored) is None
    with pytest.raises(ValueError, match="3 shard names for 2 shards"):
        MergedLinear(64, [32, 32], shard_names=("q", "k", "v"))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_split_layer_matches_its_bands(rows):
    """q/k rounded to int4 exactly as a plain int4 layer of those rows, v to int8 per channel; the output
    is the bands side by side plus the fused layer's bias, for decode and prefill sizes."""
    layer = _qkv()
    dense = layer.weight.data.clone()
    bias = layer.bias.data.clone()
    apply_quantization(layer, "int4")
    method = layer.quant_method
    assert isinstance(method, RowSplit) and layer.weight is None
    qk, v = layer.parts
    assert isinstance(qk.quant_method, Int4WeightOnly) and isinstance(v.quant_method, Int8WeightOnly)
    alone = Linear(64, 48)
    alone.weight.data.copy_(dense[:48])
    Int4WeightOnly().process_weights_after_loading(alone)
    assert torch.equal(qk.qweight, alone.qweight) and torch.equal(qk.weight_scale, alone.weight_scale)
    step = dense[48:].abs().amax(dim=1, keepdim=True) / 127
    w = method.dequantize(layer)
    assert ((w[48:] - dense[48:]).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(rows, 64)
    y = layer(x)
    assert torch.allclose(y, x @ w.T + bias, atol=1e-4)
    assert torch.allclose(y, method.reference(layer, x), atol=1e-4)


def test_packed_shards_go_to_their_band():
    """A q shard that arrived packed (a GGUF Q4 tensor, or GPTQ's result) is adopted as stored by the int4
    band, next to the dense k; the dense v is stored at int8."""
    layer = _qkv(bias=False)
    dense = layer.weight.data.clone()
    q_packed = PackedInt4(*quantize_groupwise(torch.randn(32, 64), 32))
    layer.load_shard(0, "weight", q_packed)
    apply_quantization(layer, "w4a8")
    qk, v = layer.parts
    assert isinstance(qk.quant_method, W4A8) and not layer.packed_shards
    assert torch.equal(qk.qweight[:32], q_packed.qweight)
    assert torch.equal(qk.weight_scale[:32], q_packed.scale.half())
    step = dense[48:].abs().amax(dim=1, keepdim=True) / 127
    assert ((v.quant_method.dequantize(v) - dense[48:]).abs() <= step / 2 + 1e-7).all()


def test_other_modes_keep_the_layer_whole():
    for mode in ("int8", "w8a8"):
        layer = _qkv()
        apply_quantization(layer, mode)
        assert not isinstance(layer.quant_method, RowSplit) and not hasattr(layer, "parts")


def test_attach_checks_the_bands():
    with pytest.raises(ValueError, match="do not cover"):
        RowSplit([[0], [2]]).attach(_qkv())
    layer = _qkv()
    RowSplit([[0, 1], [2]]).attach(layer)
    assert [p.out_features for p in layer.parts] == [48, 16] and all(p.weight is None for p in layer.parts)
