"""Quantization methods for Linear layers, applied from outside the model: the table and `apply_quantization`.

Every method implements the LinearMethod protocol of layers/linear.py: `process_weights_after_loading`
turns the layer's dense fp32 weight into the method's packed buffers (and drops the dense weight),
`apply(layer, x)` computes y = x W^T + b from them. Each method also has `dequantize(layer)`, the
reference its fast path is tested against.

    mode     linears                                    lm_head
    none     dense fp32                                 dense fp32
    int8     int8 per output channel, weight-only       int8
    int4     int4 group-wise asymmetric (group 32);     int8  (llama.cpp keeps the output layer at 8 bits too)
             attention v int8 (quantization/mixed.py)
    w8a8     int8 weights x per-token int8 activations  int8 weight-only (logits are computed for few rows)
    w4a8     int4 group 32 (fp16 scales) x int8         int8 per block of 32 (fp16 scales, Q8_0's
             activations per 32 (decode kernel for few  layout: a Q8_0 embedding as stored) x int8
             rows, AMX/VNNI GEMM for prefill); v: int8  activations per 32
    auto     int8 on CPU (fastest mode within +1% perplexity, see README), none elsewhere
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from scaleinfer.config import QUANTIZATION_MODES
from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear

logger = logging.getLogger(__name__)


class QuantMethod(Protocol):
    name: str

    def process_weights_after_loading(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self, layer: Linear) -> torch.Tensor: ...  # [out, in] float32, the reference weight


def _table() -> dict[str, tuple[Callable[[], QuantMethod] | None, Callable[[], QuantMethod] | None]]:
    """mode -> (factory for the decoder's linears, factory for the LM head); None keeps the layer dense."""
    from scaleinfer.quantization.int4 import W4A8, Int4WeightOnly
    from scaleinfer.quantization.int8 import Int8WeightOnly, W8A8, W8A8Block32

    return {
        "none": (None, None),
        "int8": (Int8WeightOnly, Int8WeightOnly),
        "int4": (Int4WeightOnly, Int8WeightOnly),
        "int4-g64": (lambda: Int4WeightOnly(group_size=64), Int8WeightOnly),
        "int4-g128": (lambda: Int4WeightOnly(group_size=128), Int8WeightOnly),
        "w8a8": (W8A8, Int8WeightOnly),
        "w4a8": (W4A8, W8A8Block32),
    }


def takes_packed_int4(mode: str) -> bool:
    """Whether the decoder linears of `mode` adopt GGUF Q4_0/Q4_1/Q4_K tensors without re-quantizing
    (int4 group 32: Int4WeightOnly, W4A8; the loader then hands those tensors over packed)."""
    factory = _table()[mode][0]
    method = factory() if factory is not None else None
    return hasattr(method, "adopt_packed") and method.group_size == 32


def calibrated_modes() -> list[str]:
    """Modes whose decoder weights can be GPTQ-rounded on a calibration text (the int4 ones)."""
    return [mode for mode, (factory, _) in _table().items() if factory is not None and hasattr(factory(), "adopt_packed")]


def decoder_method(mode: str):
    """A fresh method of `mode`'s decoder linears (its group size and scale storage), or None for `none`."""
    factory = _table()[mode][0]
    return factory() if factory is not None else None


def resolve_mode(name: str, device: str = "cpu") -> str:
    if name not in QUANTIZATION_MODES:
        raise ConfigError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATION_MODES)}")
    if name == "auto":
        return "int8" if device == "cpu" else "none"
    return name


def apply_quantization(model: nn.Module, name: str, *, skip_lm_head: bool = False, device: str = "cpu") -> str:
    """Swap `quant_method` on every Linear of `model` (loaded, dense) and quantize it; returns the mode used.

    The LM head is found as the module named `lm_head`; `skip_lm_head` keeps it dense.
    """
    mode = resolve_mode(name, device)
    linear_factory, head_factory = _table()[mode]
    split_v = keeps_v_int8(mode)
    count = 0
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        is_head = module_name.rpartition(".")[2] == "lm_head"
        factory = head_factory if is_head else linear_factory
        if factory is None or (is_head and skip_lm_head):
            continue
        method = factory()
        if split_v and not is_head:
            from scaleinfer.quantization.int8 import Int8WeightOnly
            from scaleinfer.quantization.mixed import RowSplit, int8_bands

            bands = int8_bands(module)
            if bands is not None:
                method = RowSplit([shards for shards, _ in bands],
                                  [Int8WeightOnly() if wide else factory() for _, wide in bands])
        install(module, method)
        count += 1
    logger.debug("quantization %s applied to %d linear layers", mode, count)
    return mode


def keeps_v_int8(mode: str) -> bool:
    """Whether `mode` stores the attention values of fused QKV layers at int8 (the int4 modes:
    quantization/mixed.py)."""
    return mode in calibrated_modes()


def install(layer: Linear, method) -> None:
    """Quantize `layer` (loaded, dense or with packed shards) with `method` and make it the layer's method."""
    if layer.packed_shards and hasattr(method, "adopt_packed"):
        method.adopt_packed(layer)            # GGUF 4-bit weights or GPTQ's results, taken as stored
    else:
        layer.materialize_packed()
        method.process_weights_after_loading(layer)
    layer.quant_method = method


def drop_dense_weight(layer: Linear) -> None:
    """Free the fp32 weight once packed (a tied LM head only lets go of its reference)."""
    layer.weight = None  # type: ignore[assignment]


def dense_weight(layer: Linear) -> torch.Tensor:
    """The layer's fp32 weight [out, in] as a float32 tensor (any memory layout)."""
    if layer.weight is None:
        raise ConfigError("this layer is already quantized; quantize a freshly loaded model")
    return layer.weight.detach().float()
