"""What every quantization method does to a Linear: read its dense weight, drop it, install a method."""
from __future__ import annotations

import torch

from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear


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
