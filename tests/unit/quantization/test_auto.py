"""`--quantization auto` (quantization/auto.py): each weight in the layout of at least its stored bits."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from scaleinfer.layers.linear import DenseLinearMethod, Linear, MergedLinear
from scaleinfer.quantization.auto import apply_auto, auto_int8, layout
from scaleinfer.quantization.int4 import W4A8, PackedInt4, quantize_groupwise
from scaleinfer.quantization.int8 import W8A8, W8A8Block32
from scaleinfer.kernels import cpu_kernels
from scaleinfer.quantization.mixed import RowSplit


def test_each_stored_type_gets_at_least_its_bits():
    assert [layout(t) for t in ("Q4_0", "Q4_1", "Q4_K", "Q3_K")] == ["int4"] * 4
    assert [layout(t) for t in ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL")] == ["int8"] * 6
    assert [layout(t) for t in ("F32", "F16", "BF16", None)] == ["float"] * 4


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv_proj = MergedLinear(64, [32, 16, 16], shard_names=("q", "k", "v"))
        self.o_proj = Linear(64, 64)
        self.up_proj = Linear(64, 32)
        self.lm_head = Linear(64, 100)
        for layer in (self.qkv_proj, self.o_proj, self.up_proj, self.lm_head):
            layer.weight.data.copy_(torch.randn(layer.out_features, 64) * 0.1)
        # q arrives packed (a GGUF Q4_K tensor handed over as stored)
        self.qkv_proj.load_shard(0, "weight", PackedInt4(*quantize_groupwise(torch.randn(32, 64) * 0.1, 32)))


def test_layers_follow_their_stored_types():
    model = _Tiny()
    packed_q = model.qkv_proj.packed_shards[0].qweight.clone()
    counts = apply_auto(model, {"qkv_proj": {0: "Q4_K", 1: "Q4_K", 2: "Q6_K"}, "o_proj": {0: "Q5_0"},
                                "up_proj": {0: "F16"}, "lm_head": {0: "Q8_0"}})
    qkv = model.qkv_proj.quant_method
    assert isinstance(qkv, RowSplit) and qkv.bands == [[0, 1], [2]]
    int8 = auto_int8()
    assert [type(p.quant_method) for p in model.qkv_proj.parts] == [W4A8, int8]
    assert torch.equal(model.qkv_proj.parts[0].qweight[:32], packed_q)   # the stored int4, not re-rounded
    assert isinstance(model.o_proj.quant_method, int8)
    assert isinstance(model.up_proj.quant_method, DenseLinearMethod)
    assert isinstance(model.lm_head.quant_method, W8A8Block32)
    assert counts == {"rows": 1, "w8a8-g32": 2} if int8 is W8A8Block32 else \
        counts == {"rows": 1, "w8a8": 1, "w8a8-g32": 1}   # o_proj, and the head (always block-32)


def test_the_8_bit_layout_follows_the_cpu():
    """Block-32 int8 x int8 where the a8 kernels run (512-bit VNNI); per-channel W8A8 (AVX2 kernels) elsewhere."""
    from tests.kernel_tests.kernel_paths import forced_isa

    ops = cpu_kernels()
    if ops is None:
        assert auto_int8() is W8A8
        return
    assert auto_int8() is (W8A8Block32 if ops.a8_gemm_path() != "none" else W8A8)
    with forced_isa("avx2"):   # skips where the CPU has no AVX2
        assert ops.a8_gemm_path() == "none" and auto_int8() is W8A8


@pytest.mark.slow
def test_auto_is_w4a8_on_an_all_q4_file_and_the_default():
    """SmolLM2's file is Q4_1 throughout with a Q8_0 embedding: auto is exactly w4a8 there."""
    from scaleinfer import LLM
    from scaleinfer.config import EngineConfig

    assert EngineConfig().quantization == "auto"
    prompt = [1, 504, 3458, 282, 4649, 314]
    logits = {}
    for mode in ("auto", "w4a8"):
        llm = LLM("smollm2-135m-instruct", kv_cache_memory="16MiB", max_model_len=64, quantization=mode)
        assert isinstance(llm.engine.model.layers[0].mlp.gate_up_proj.quant_method, W4A8)
        assert isinstance(llm.engine.model.lm_head.quant_method, W8A8Block32)
        logits[mode] = llm.engine.compute_logits(prompt)
    assert torch.equal(logits["auto"], logits["w4a8"])


def test_auto_is_none_for_float_checkpoints_and_off_the_cpu():
    from scaleinfer.quantization.base import resolve_mode

    assert resolve_mode("auto", "cpu", stored=True) == "auto"
    assert resolve_mode("auto", "cpu", stored=False) == "none"    # HF safetensors: float as today
    assert resolve_mode("auto", "cuda", stored=True) == "none"    # our low-bit kernels are CPU kernels
    assert resolve_mode("w8a8", "cpu", stored=False) == "w8a8"
