"""Applying quantization from outside the model: `apply_quantization` swaps every Linear's method by the
mode's entry in the table (quantization/table.py).

Every method implements the LinearMethod protocol of layers/linear.py: `process_weights_after_loading`
turns the layer's dense fp32 weight into the method's packed buffers (and drops the dense weight),
`apply(layer, x)` computes y = x W^T + b from them. Each method also has `dequantize(layer)`, the
reference its fast path is tested against.
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from scaleinfer.config import QUANTIZATION_MODES
from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int8 import Int8WeightOnly
from scaleinfer.quantization.layer_ops import install
from scaleinfer.quantization.mixed import RowSplit, int8_bands
from scaleinfer.quantization.table import MODES

logger = logging.getLogger(__name__)


class QuantMethod(Protocol):
    name: str

    def process_weights_after_loading(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self, layer: Linear) -> torch.Tensor: ...  # [out, in] float32, the reference weight


def takes_packed_int4(mode: str) -> bool:
    """Whether the decoder linears of `mode` adopt GGUF Q4_0/Q4_1/Q4_K tensors without re-quantizing
    (int4 group 32: Int4WeightOnly, W4A8; the loader then hands those tensors over packed)."""
    return MODES[mode].adopts_packed_int4


def calibrated_modes() -> list[str]:
    """Modes whose decoder weights can be GPTQ-rounded on a calibration text (the int4 ones)."""
    return [m.name for m in MODES.values() if m.bits == 4]


def decoder_method(mode: str):
    """A fresh method of `mode`'s decoder linears (its group size and scale storage), or None for `none`."""
    factory = MODES[mode].linear
    return factory() if factory is not None else None


def resolve_mode(name: str, device: str = "cpu", stored: bool = True) -> str:
    """The mode to apply: `name`, except that auto is none off the CPU (our low-bit kernels are CPU kernels)
    or when the checkpoint stores no quantized tensors (`stored` False: HF safetensors)."""
    if name not in QUANTIZATION_MODES:
        raise ConfigError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATION_MODES)}")
    if name == "auto" and (device != "cpu" or not stored):
        return "none"
    return name


def apply_quantization(model: nn.Module, name: str, *, skip_lm_head: bool = False, device: str = "cpu") -> str:
    """Swap `quant_method` on every Linear of `model` (loaded, dense) and quantize it; returns the mode used.

    The LM head is found as the module named `lm_head`; `skip_lm_head` keeps it dense.
    """
    mode = resolve_mode(name, device)
    if mode == "auto":
        raise ConfigError("quantization auto follows the checkpoint's stored types: use quantization.auto.apply_auto")
    linear_factory, head_factory = MODES[mode].linear, MODES[mode].head
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
    return MODES[mode].bits == 4
