"""int4 weights, group-wise asymmetric (`int4`, group 32 by default; 64 and 128 also offered).

Each group of G consecutive input weights of an output row gets an fp32 scale and min:
w ~= q * scale + min with q in [0, 15] (min/max of the group map to 0/15). Packing, per chunk of 32
elements: 16 bytes, byte i = q[i] | q[i + 16] << 4. That is the GGUF Q4_0 / Q4_1 block layout:
Q4_1 (d, m) is exactly scale = d, min = m at G = 32, and re-quantizing a Q4_1-dequantized weight
recovers the same q (tested), so a Q4_1 GGUF loses nothing more here.

Inputs of up to KERNEL_MAX_ROWS rows run in our kernel (kernels.py: at M = 1 it reads the packed bytes
directly, for M > 1 it multiplies dequantized row pairs with 4 input rows per register tile); longer
inputs dequantize slices of rows to fp32 and use BLAS (dense_chunks.py; compute-bound there anyway). torch's own
`_weight_int4pack_mm_for_cpu` measured 0.6 GB/s on this machine, far too slow to use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleinfer.layers.linear import DecodeSpec, Linear
from scaleinfer.quantization.layer_ops import dense_weight, drop_dense_weight
from scaleinfer.quantization.dense_chunks import sliced_linear
from scaleinfer.kernels import cpu_kernels

logger = logging.getLogger(__name__)

KERNEL_MAX_ROWS = 128
"""Inputs with at most this many rows use the int4 kernel (M = 1: fused GEMV; M > 1: 2x4 register
tiles over dequantized row pairs); larger ones dequantize slices + BLAS. Measured (2 threads,
AVX-512): the tiles beat slices + BLAS up to M = 128 on 576x1536, 1536x576 and 4096x4096 (4096x4096
at M = 64: 12.5 ms vs 25.1 ms) and lose at M = 256 on the 4096-wide layer."""


def quantize_groupwise(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> packed q [N, K / 2] uint8, scale [N, K / G], min [N, K / G] (float32)."""
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)       # [N, K / G, G]
    lo = groups.amin(dim=-1)
    hi = groups.amax(dim=-1)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((groups - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scale.contiguous(), lo.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] -> [N, K / 2] uint8; per 32-chunk byte i = q[i] | q[i + 16] << 4."""
    n, k = q.shape
    chunks = q.reshape(n, k // 32, 2, 16)                    # [N, chunks, low/high half, 16]
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: [N, K / 2] uint8 -> [N, K] uint8."""
    n, half = packed.shape
    b = packed.reshape(n, half // 16, 1, 16)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(n, half * 2)


def dequantize_groupwise(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()
    n, k = q.shape
    g = scale.shape[1]
    return (q.view(n, g, k // g) * scale[..., None] + mn[..., None]).view(n, k)


@dataclass
class PackedInt4:
    """A weight that arrives already in our int4 group-32 layout (a GGUF Q4_0 / Q4_1 / Q4_K tensor,
    see weights/gguf.py): the loader hands it to the Linear as is, Int4WeightOnly adopts it."""

    qweight: torch.Tensor   # [N, K / 2] uint8, pack_int4 layout
    scale: torch.Tensor     # [N, K / 32] float32
    min: torch.Tensor       # [N, K / 32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        return dequantize_groupwise(self.qweight, self.scale, self.min)


def fitting_group(in_features: int, group_size: int) -> int:
    """`group_size`, or the largest multiple of 32 dividing both it and `in_features` (e.g. SmolLM2's 576
    inputs at group 128 -> 64)."""
    if in_features % 32:
        raise ValueError(f"in_features {in_features} is not a multiple of 32, which int4 packing needs")
    if in_features % group_size == 0:
        return group_size
    fitting = max(g for g in range(32, group_size, 32) if in_features % g == 0 and group_size % g == 0)
    logger.debug("in_features %d: int4 group %d -> %d", in_features, group_size, fitting)
    return fitting


class Int4WeightOnly:
    name = "int4"
    half_scales = False
    """Whether group scales and mins are stored as float16 (W4A8); GPTQ rounds with them as stored."""

    def __init__(self, group_size: int = 32):
        if group_size % 32:
            raise ValueError(f"int4 group size must be a multiple of 32, got {group_size}")
        self.group_size = group_size

    def process_weights_after_loading(self, layer: Linear) -> None:
        w = dense_weight(layer)
        self.group_size = fitting_group(w.shape[1], self.group_size)
        q, scale, mn = quantize_groupwise(w, self.group_size)
        drop_dense_weight(layer)
        layer.register_buffer("qweight", q)            # [out, in / 2] uint8
        layer.register_buffer("weight_scale", scale)   # [out, in / G] float32
        layer.register_buffer("weight_min", mn)        # [out, in / G] float32

    def adopt_packed(self, layer: Linear) -> None:
        """Install the layer's packed shards (`layer.packed_shards`: a GGUF's Q4 tensors, or GPTQ's results)
        without re-quantizing; shards that came dense are quantized here. Each output row's groups are
        independent, so the fused layer is the row-wise concatenation of its shards."""
        self.group_size = fitting_group(layer.in_features, self.group_size)
        parts = []
        for shard, (start, stop) in enumerate(layer.shard_bounds()):
            packed = layer.packed_shards.get(shard)
            if packed is None:
                packed = PackedInt4(*quantize_groupwise(dense_weight(layer)[start:stop], self.group_size))
            elif packed.shape != (stop - start, layer.in_features) or \
                    packed.scale.shape[1] * self.group_size != layer.in_features:
                raise ValueError(f"packed shard {shard} of shape {packed.shape} (groups of "
                                 f"{layer.in_features // packed.scale.shape[1]}) does not fit rows {start}:{stop} "
                                 f"x {layer.in_features} in groups of {self.group_size}")
            parts.append(packed)
        drop_dense_weight(layer)
        layer.packed_shards = {}
        layer.register_buffer("qweight", torch.cat([p.qweight for p in parts]).contiguous())
        layer.register_buffer("weight_scale", torch.cat([p.scale for p in parts]).contiguous())
        layer.register_buffer("weight_min", torch.cat([p.min for p in parts]).contiguous())

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return dequantize_groupwise(layer.qweight, *self.scales(layer))

    def decode_spec(self, layer: Linear) -> DecodeSpec:
        return DecodeSpec("int4", [layer.qweight, layer.weight_scale, layer.weight_min], layer.bias,
                          self.group_size, KERNEL_MAX_ROWS)

    def scales(self, layer: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """The group scales and minimums as float32 [N, K / G] (what the weight-only kernels read)."""
        return layer.weight_scale, layer.weight_min

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])                # [M, in]
        ops = cpu_kernels() if x.device.type == "cpu" else None
        if ops is not None and x2.dtype == torch.float32:
            scale, mn = self.scales(layer)
            if x2.shape[0] <= KERNEL_MAX_ROWS:
                y = ops.int4_linear(x2.contiguous(), layer.qweight, scale, mn, self.group_size)
                if layer.bias is not None:
                    y += layer.bias
            else:
                q, g = layer.qweight, self.group_size
                def rows(n0: int, n1: int, out: torch.Tensor) -> None:
                    ops.int4_dequantize_out(q[n0:n1], scale[n0:n1], mn[n0:n1], g, out)

                y = sliced_linear(x2, q.shape[0], layer.bias, rows)
        else:
            y = F.linear(x2, self.dequantize(layer).to(x.dtype), layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


W4A8_MAX_ROWS = 16
"""Inputs of at most this many rows (decode, small batches) take the decode kernel (csrc/int4_a8.cpp: each
weight byte read once per input row); longer ones (prefill) the GEMM of csrc/a8_gemm.cpp (weights unpacked
to bytes per block, AMX-INT8 tiles or 512-bit VNNI), which computes the same numbers. CPUs without
AVX512-VNNI have no such GEMM (`a8_gemm_path()` is "none") and prefill with the int4 weight-only kernels."""


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of 32 along the last dim, symmetric int8: x ~= xq * d; returns (xq [.., K] int8, d [.., K/32])."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(dim=-1) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    xq = torch.where(d[..., None] > 0, torch.round(blocks / safe[..., None]), torch.zeros_like(blocks))
    return xq.to(torch.int8).reshape(x.shape), d


def a8_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What an a8 kernel computes for small inputs, in plain fp32: activations quantized per block of 32
    (quantize_blocks) times the dequantized `weight` (W4A8, W8A8Block32)."""
    xq, d = quantize_blocks(x.reshape(-1, x.shape[-1]))
    xd = (xq.float().view(xq.shape[0], -1, 32) * d[..., None]).view(xq.shape)
    return F.linear(xd, weight, bias)


class W4A8(Int4WeightOnly):
    """`w4a8`: int4 group-32 weights (the packing of `int4`, so GGUF Q4 tensors load without re-rounding)
    with activations quantized per block of 32 to int8 and multiplied as integers (csrc/int4_a8.cpp,
    VNNI or AVX2): llama.cpp's Q4 x Q8 scheme. The kernel is chosen by rows (W4A8_MAX_ROWS): the decode
    kernel for a few, the GEMM of csrc/a8_gemm.cpp (AMX-INT8 where it works, else 512-bit VNNI) for
    prefills; both compute `reference`. Without AVX512-VNNI, prefills take the int4 weight-only kernels.

    Group scales and minimums are stored as float16, like Q4_0 / Q4_1 store them: at batch-1 decode
    the kernel is bound by the bytes it reads, and fp32 scales are a third of them (4 bits of weight +
    64 bits of scale and min per 32 weights: 6 bits per weight; fp16: 5). Q4_0 and Q4_1 scales are
    fp16 values, so they stay exact; Q4_K's (a 6-bit scale times an fp16 super-scale) and re-quantized
    weights' are rounded to fp16 (relative error <= 2^-11 of a group's scale)."""

    name = "w4a8"
    half_scales = True

    def __init__(self, group_size: int = 32):
        if group_size != 32:
            raise ValueError("w4a8 uses int4 groups of 32")
        super().__init__(32)

    def process_weights_after_loading(self, layer: Linear) -> None:
        super().process_weights_after_loading(layer)
        self._half_scales(layer)

    def adopt_packed(self, layer: Linear) -> None:
        super().adopt_packed(layer)
        self._half_scales(layer)

    @staticmethod
    def _half_scales(layer: Linear) -> None:
        layer.register_buffer("weight_scale", layer.weight_scale.half())   # [out, in / 32] float16
        layer.register_buffer("weight_min", layer.weight_min.half())       # [out, in / 32] float16

    def scales(self, layer: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.weight_scale.float(), layer.weight_min.float()

    def decode_spec(self, layer: Linear) -> DecodeSpec:
        return DecodeSpec("w4a8", [layer.qweight, layer.weight_scale, layer.weight_min], layer.bias, 32,
                          W4A8_MAX_ROWS)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ops = cpu_kernels() if x.device.type == "cpu" else None
        if ops is None or x2.dtype != torch.float32:
            return super().apply(layer, x)
        if x2.shape[0] <= W4A8_MAX_ROWS:
            y = ops.int4_a8_linear(x2.contiguous(), layer.qweight, layer.weight_scale, layer.weight_min)
        elif ops.a8_gemm_path() != "none":
            y = ops.int4_a8_gemm(x2.contiguous(), layer.qweight, layer.weight_scale, layer.weight_min)
        else:
            return super().apply(layer, x)
        if layer.bias is not None:
            y += layer.bias
        return y.view(*x.shape[:-1], y.shape[-1])

    def reference(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return a8_reference(x, self.dequantize(layer), layer.bias)


def w4a8_kernel_paths() -> dict[str, str]:
    """Which code paths w4a8 runs on this CPU, in this process: decode (<= W4A8_MAX_ROWS rows) and prefill."""
    ops = cpu_kernels()
    if ops is None:
        return {"decode": "torch (no C++ kernels)", "prefill": "torch (no C++ kernels)"}
    gemm = ops.a8_gemm_path()
    return {"decode": ops.isa(), "prefill": gemm if gemm != "none" else f"int4 weight-only ({ops.isa()})",
            "amx": ops.amx_status()}
