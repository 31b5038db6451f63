"""The draft model's --quantization: a dense (HF safetensors) draft under auto on the CPU is quantized like a
low-bit target instead of running fp32 (whose weight traffic per draft token cost ~a whole target step)."""
from __future__ import annotations

from scaleinfer.config import EngineConfig
from scaleinfer.engine.speculative import DRAFT_QUANTIZATION, draft_quantization


def test_auto_quantizes_a_dense_draft_on_cpu():
    assert draft_quantization(EngineConfig(quantization="auto", device="cpu"), stored=False) == DRAFT_QUANTIZATION
    assert DRAFT_QUANTIZATION == "w8a8"


def test_a_stored_quantized_draft_keeps_auto():
    assert draft_quantization(EngineConfig(quantization="auto", device="cpu"), stored=True) == "auto"


def test_an_explicit_mode_is_kept():
    for mode in ("none", "int8", "w8a8", "w4a8"):
        assert draft_quantization(EngineConfig(quantization=mode, device="cpu"), stored=False) == mode


def test_auto_off_the_cpu_is_left_to_the_loader():
    assert draft_quantization(EngineConfig(quantization="auto", device="cuda"), stored=False) == "auto"
