"""Different precisions inside one fused linear: the int4 modes keep the attention values (v) at int8.

A fused QKV layer multiplies one input by three stacked weights, but their rounding costs differ: on
Qwen2.5-0.5B (hongloumeng, the first 12 windows, rounding one tensor kind at a time to int4) v alone
costs +3.6% perplexity, q and k together +0.1%. llama.cpp's Q4_K_M keeps attn_v at 6 bits for the
same reason. `RowSplit` stores bands of a layer's shards with their own methods (each band a sub-Linear
in `layer.parts`, so every method, kernel, checkpoint buffer and decode spec is the existing one) and
concatenates their outputs; the bias stays on the fused layer and is added after.
"""
from __future__ import annotations

import torch
from torch import nn

from scaleinfer.layers.linear import DecodeSpec, Linear, MergedLinear
from scaleinfer.quantization.layer_ops import drop_dense_weight, install

INT8_SHARDS = ("v",)
"""Shards the int4 modes store as int8 per output channel (weight-only) instead of int4 (unless stored in
the checkpoint as Q4: `int8_bands`). v is 0.8% of Qwen2.5-0.5B's decoder weights; with it at int8,
Qwen's int4 perplexity on hongloumeng goes from +9.9% to +5.5% (nearest) and from +6.1% to +2.4% (GPTQ)
(README, Compression)."""


def int8_shards(layer: Linear) -> set[int]:
    """The shards of `layer` the int4 modes store at int8: those named in INT8_SHARDS, unless one arrived as a
    4-bit tensor the int4 layout takes exactly (a GGUF Q4_0 / Q4_1 / Q4_K one: then int4 is the
    checkpoint's own weights and costs nothing)."""
    names = getattr(layer, "shard_names", ())
    return {i for i, n in enumerate(names) if n in INT8_SHARDS and i not in layer.packed_shards}


def int8_bands(layer: Linear) -> list[tuple[list[int], bool]] | None:
    """The layer's shards grouped into consecutive bands, each (shards, whether it goes to int8), or None
    when none goes to int8 (`int8_shards`; the whole layer then takes the mode's method)."""
    wide = int8_shards(layer)
    if not wide:
        return None
    bands: list[tuple[list[int], bool]] = []
    for i in range(len(layer.shard_bounds())):
        if bands and bands[-1][1] == (i in wide):
            bands[-1][0].append(i)
        else:
            bands.append(([i], i in wide))
    return bands


def _band_layer(layer: Linear, shards: list[int]) -> Linear:
    """An empty sub-Linear for `shards` of `layer` (a MergedLinear when it holds several, so packed shards
    keep their index), without bias."""
    bounds = layer.shard_bounds()
    sizes = [bounds[s][1] - bounds[s][0] for s in shards]
    if len(sizes) == 1:
        return Linear(layer.in_features, sizes[0])
    return MergedLinear(layer.in_features, sizes, shard_names=tuple(layer.shard_names[s] for s in shards))


class RowSplit:
    """Bands of a fused layer's shards, each stored and multiplied by its own method (layer.parts[i] is
    band i's sub-Linear); the output is their concatenation plus the layer's bias."""

    name = "rows"

    def __init__(self, bands: list[list[int]], methods: list | None = None):
        if not isinstance(bands, list) or not all(isinstance(b, list) and b for b in bands):
            raise ValueError(f"bands must be a list of non-empty lists of shard indices, got {bands!r}")
        self.bands = [list(b) for b in bands]
        self.methods = methods

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Cut the dense weight and the packed shards (GGUF Q4 tensors, GPTQ's results) into the bands and
        install each band's method (`layer_ops.install`: packed shards are adopted where the method
        can); then drop the layer's own weight."""
        bounds = layer.shard_bounds()
        parts = []
        for shards, method in zip(self.bands, self.methods):
            sub = _band_layer(layer, shards)
            lo, hi = bounds[shards[0]][0], bounds[shards[-1]][1]
            sub.weight = nn.Parameter(layer.weight.data[lo:hi], requires_grad=False)
            sub.packed_shards = {j: layer.packed_shards[s] for j, s in enumerate(shards) if s in layer.packed_shards}
            install(sub, method)
            parts.append(sub)
        drop_dense_weight(layer)
        layer.packed_shards = {}
        layer.parts = nn.ModuleList(parts)

    adopt_packed = process_weights_after_loading  # packed shards are handed on to the bands' methods

    def attach(self, layer: Linear) -> None:
        """Empty bands (no weights) for a quantized checkpoint to fill under `{layer}.parts.{i}`."""
        if [s for band in self.bands for s in band] != list(range(len(layer.shard_bounds()))):
            raise ValueError(f"bands {self.bands} do not cover the layer's {len(layer.shard_bounds())} shards in order")
        parts = []
        for shards in self.bands:
            sub = _band_layer(layer, shards)
            sub.weight = None  # type: ignore[assignment]
            parts.append(sub)
        layer.parts = nn.ModuleList(parts)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p.quant_method.apply(p, x) for p in layer.parts], dim=-1)
        if layer.bias is not None:
            y += layer.bias
        return y

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return torch.cat([p.quant_method.dequantize(p) for p in layer.parts])

    def reference(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """What `apply` computes, from each band's reference (its dequantized weight, or its method's own
        `reference` where activations are quantized too)."""
        ys = []
        for p in layer.parts:
            ref = getattr(p.quant_method, "reference", None)
            ys.append(ref(p, x) if ref is not None else torch.nn.functional.linear(x, p.quant_method.dequantize(p)))
        y = torch.cat(ys, dim=-1)
        return y + layer.bias if layer.bias is not None else y

    def decode_spec(self, layer: Linear) -> DecodeSpec | None:
        specs = [getattr(p.quant_method, "decode_spec", lambda _: None)(p) for p in layer.parts]
        if any(s is None or s.parts or s.bias is not None for s in specs):
            return None
        return DecodeSpec("split", [], layer.bias, 0, min(s.max_rows for s in specs), tuple(specs))
