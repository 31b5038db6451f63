"""`--quantization auto`: every weight as stored, in our fastest kernels (CPU; elsewhere weights stay float).

Each GGUF tensor goes to the layout with at least its stored bits:

    stored as                               decoder linears                     LM head
    Q4_0, Q4_1, Q4_K (and Q2_K, Q3_K)       int4 group 32 x int8 activations    int8 per block of 32 x
                                            (W4A8; Q4_0/Q4_1/Q4_K taken exactly) int8 activations
    Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, IQ4_*     auto_int8(): int8 per block of 32 x  (W8A8Block32: a Q8_0
                                            int8 activations (W8A8Block32; Q8_0  head exactly)
                                            taken exactly; per-channel W8A8
                                            without AVX512-VNNI)
    F32, F16, BF16 (and HF safetensors)     dense float                         dense float

A fused linear whose shards were stored differently (Q/K at Q4_K, V at Q6_K) is split into bands of
consecutive shards, each with its own method (mixed.RowSplit); one float shard keeps the layer float.
"""
from __future__ import annotations

import logging

from torch import nn

from scaleinfer.layers.linear import Linear
from scaleinfer.quantization.int4 import W4A8
from scaleinfer.kernels import cpu_kernels
from scaleinfer.quantization.int8 import W8A8, W8A8Block32
from scaleinfer.quantization.layer_ops import install
from scaleinfer.quantization.mixed import RowSplit

logger = logging.getLogger(__name__)

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q2_K", "Q3_K")
"""GGML types at most 4 bits wide per weight in a linear scale: our int4 group-32 layout holds them."""
FLOAT_TYPES = ("F32", "F16", "BF16")
def auto_int8():
    """The 8-bit method of auto on this CPU. Where the a8 kernels run (AVX512-VNNI: `a8_gemm_path()` is not
    "none"), W8A8Block32: Q8_0's layout with int8 activations (llama.cpp multiplies Q6_K and Q8_0 by int8
    activations too), decode on the streamed a8 GEMV that w4a8's LM head uses, prefill on the a8 GEMM. It was
    W8A8 (per-channel int8; fp32 activations below 16 rows), whose GEMV widens bytes to fp32: ~18 GB/s where
    the a8 one streams ~34 (Qwen2.5-1.5B Q4_K_M's 14 Q6_K down projections: 11.1 -> 6.0 ms a token). Other
    CPUs keep W8A8: their block-32 GEMV is a scalar loop, the per-channel kernel has an AVX2 path."""
    ops = cpu_kernels()
    return W8A8Block32 if ops is not None and ops.a8_gemm_path() != "none" else W8A8


def layout(type_name: str | None) -> str:
    """"int4", "int8" or "float": the layout auto gives a tensor stored as GGML type `type_name` (None: not
    from a GGUF, i.e. float)."""
    if type_name is None or type_name in FLOAT_TYPES:
        return "float"
    return "int4" if type_name in INT4_TYPES else "int8"


def _bands(layouts: list[str]) -> list[tuple[list[int], str]]:
    """Consecutive shards of the same layout: [(shard indices, layout), ...]."""
    bands: list[tuple[list[int], str]] = []
    for i, kind in enumerate(layouts):
        if bands and bands[-1][1] == kind:
            bands[-1][0].append(i)
        else:
            bands.append(([i], kind))
    return bands


def _method(layouts: list[str]):
    """The method of a decoder linear whose shards have `layouts`, or None to keep it dense."""
    if "float" in layouts:
        return None
    factory = {"int4": W4A8, "int8": auto_int8()}
    bands = _bands(layouts)
    if len(bands) == 1:
        return factory[bands[0][1]]()
    return RowSplit([shards for shards, _ in bands], [factory[kind]() for _, kind in bands])


def apply_auto(model: nn.Module, stored: dict[str, dict[int, str]]) -> dict[str, int]:
    """Quantize every Linear of `model` (loaded; GGUF Q4 shards packed) by how its checkpoint stored it:
    `stored` maps module name -> shard -> GGML type name. Returns how many layers took each method."""
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        types = stored.get(name, {})
        layouts = [layout(types.get(shard)) for shard in range(len(module.shard_bounds()))]
        if name.rpartition(".")[2] == "lm_head":
            method = W8A8Block32() if "float" not in layouts else None
        else:
            method = _method(layouts)
        if method is None:
            continue
        install(module, method)
        counts[method.name] = counts.get(method.name, 0) + 1
    logger.debug("quantization auto: %s", counts)
    return counts
