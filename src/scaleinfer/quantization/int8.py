"""int8 weights, one scale per output channel: weight-only (`int8`) and with int8 activations (`w8a8`).

Weight-only keeps activations in fp32: y = x (q * scale)^T. Inputs of up to KERNEL_MAX_ROWS rows (decode,
batched decode, short prefills) run in our kernel (kernels.py): at M = 1 it widens the int8 weights to
fp32 in registers, for M > 1 it dequantizes two weight rows at a time into an L1 buffer and multiplies
them with 4 input rows per register tile, so the result equals the dequantized reference up to
summation order. Longer inputs dequantize slices of rows and use BLAS (dense_chunks.py).

W8A8 also quantizes activations, per token (one scale per row of x), and multiplies int8 x int8 ->
int32 with torch._int_mm (oneDNN; VNNI where the CPU has it), ~8x the fp32 matmul rate here at
M = 512. fbgemm's `quantized::linear_dynamic` is as fast but quantizes activations per tensor (one
scale for the whole batch: an outlier token costs every other token precision), so we do not use it.
Inputs with fewer than W8A8_MIN_ROWS rows (batch-1 decode) take the weight-only kernel: at M = 1 the
cost is reading the weights, and the weight-only path is both faster and more exact there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleinfer.layers.linear import DecodeSpec, Linear
from scaleinfer.quantization.layer_ops import dense_weight, drop_dense_weight
from scaleinfer.quantization.dense_chunks import sliced_linear
from scaleinfer.quantization.int4 import a8_reference
from scaleinfer.kernels import cpu_kernels

KERNEL_MAX_ROWS = 128
"""Inputs with at most this many rows use the int8 kernel; larger ones dequantize slices + BLAS.
Measured (2 threads, AVX-512): the 2x4-tile kernel beats fp32 BLAS up to M = 128 on 576x1536,
1536x576, 3072x576 and 4096x4096 (e.g. 4096x4096 at M = 64: 10.4 ms vs 16.4 ms), and loses to
slices + BLAS at M = 256 on 4096-wide layers."""
W8A8_MIN_ROWS = 16
"""Fewer rows than this: W8A8 uses the weight-only kernel (torch._int_mm is slow for tiny M on CPU)."""


def quantize_per_channel(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: q in [-127, 127], w ~= q * scale[:, None]. `amax` [out], when given, is
    each row's largest |w| over the whole row, of which w holds some columns (a row-parallel shard)."""
    if amax is None:
        amax = w.abs().amax(dim=1)
    scale = (amax / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale.float().contiguous()


def quantize_per_token(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [M, K]: returns q [M, K] int8 and scale [M, 1]. `amax` [M, 1], when given,
    is each row's largest |value| over the whole row, of which x holds only some columns (a row-parallel
    shard: every rank then rounds its columns on the scale one process would use)."""
    if amax is None:
        amax = x.abs().amax(dim=1, keepdim=True)
    scale = (amax / 127.0).clamp_(min=1e-12)
    # One temporary, rounded and clamped in place: a fresh tensor per op cost 10x on a whisper encoder's
    # [1500, 2048] input (page faults on every new buffer), the same numbers.
    q = torch.div(x, scale).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightOnly:
    name = "int8"

    def process_weights_after_loading(self, layer: Linear) -> None:
        q, scale = quantize_per_channel(dense_weight(layer), getattr(layer, "row_amax", None))
        drop_dense_weight(layer)
        layer.register_buffer("qweight", q)              # [out, in] int8
        layer.register_buffer("weight_scale", scale)     # [out] float32

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.qweight.float() * layer.weight_scale[:, None]

    def decode_spec(self, layer: Linear) -> DecodeSpec:
        return DecodeSpec("int8", [layer.qweight, layer.weight_scale], layer.bias, max_rows=KERNEL_MAX_ROWS)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])                  # [M, in]
        ops = cpu_kernels() if x.device.type == "cpu" else None
        if ops is not None and x2.shape[0] <= KERNEL_MAX_ROWS and x2.dtype == torch.float32:
            y = ops.int8_linear(x2.contiguous(), layer.qweight, layer.weight_scale)
            if layer.bias is not None:
                y += layer.bias
        elif ops is not None and x2.dtype == torch.float32:
            q, scale = layer.qweight, layer.weight_scale
            y = sliced_linear(x2, q.shape[0], layer.bias,
                              lambda n0, n1, out: ops.int8_dequantize_out(q[n0:n1], scale[n0:n1], out))
        else:
            y = F.linear(x2, self.dequantize(layer).to(x.dtype), layer.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


class W8A8(Int8WeightOnly):
    name = "w8a8"

    def decode_spec(self, layer: Linear) -> DecodeSpec:
        return super().decode_spec(layer)._replace(max_rows=W8A8_MIN_ROWS - 1)  # the int8 kernel's rows

    def apply(self, layer: Linear, x: torch.Tensor, group_amax=None) -> torch.Tensor:
        """`group_amax`, for a row-parallel shard of the input columns: a function from this shard's per-row
        largest |x| [M, 1] to the whole row's (layers/parallel.py's RowParallel passes the group's maximum)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] < W8A8_MIN_ROWS or x.device.type != "cpu" or x2.dtype != torch.float32:
            return super().apply(layer, x)
        amax = x2.abs().amax(dim=1, keepdim=True)
        xq, x_scale = quantize_per_token(x2, amax if group_amax is None else group_amax(amax))
        acc = torch._int_mm(xq, layer.qweight.t())     # [M, out] int32; weight read column-major
        y = acc.float().mul_(x_scale).mul_(layer.weight_scale)
        if layer.bias is not None:
            y += layer.bias
        return y.view(*x.shape[:-1], y.shape[-1])

    def reference(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """What apply computes for large M, in plain fp32: quantized activations times dequantized weights."""
        xq, x_scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
        return F.linear(xq.float() * x_scale, self.dequantize(layer), layer.bias)


A8_BLOCK_MAX_ROWS = 64
"""Without the a8 GEMM (no AVX512-VNNI), inputs of at most this many rows (decode batches: the LM head only
sees sampled rows) take the integer GEMV kernel; its 64-row weight chunks stay in L2 across the input rows.
Longer ones dequantize slices + BLAS. With the GEMM, the GEMV takes up to A8_BLOCK_GEMV_ROWS rows."""
A8_BLOCK_GEMV_ROWS = 16
"""With the a8 GEMM (csrc/a8_gemm.cpp: int8_a8_gemm), inputs of more rows than this take it, as w4a8's do
(int4.py: W4A8_MAX_ROWS): a decode batch or a speculative verification stays on the batch-invariant GEMV."""


def quantize_blocks32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0's recipe: per block of 32 inputs d = amax / 127, q = round(w / d), d stored as float16.
    A Q8_0 tensor's dequantized values come back exactly (each block's largest |q| is 127, so amax / 127
    is its fp16 scale again): the LM head of a Q8_0 embedding is the file's own."""
    n, k = w.shape
    blocks = w.float().contiguous().view(n, k // 32, 32)
    d = blocks.abs().amax(dim=-1) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return q, d.half()


class W8A8Block32:
    """int8 weights with a float16 scale per block of 32 inputs (GGUF Q8_0's layout) times activations
    quantized per block of 32, multiplied as integers: llama.cpp's Q8_0 x Q8_0. Up to A8_BLOCK_GEMV_ROWS
    rows (decode) csrc/int8_a8.cpp's GEMV (AVX512-VNNI; a scalar loop elsewhere), more rows the GEMM of
    csrc/a8_gemm.cpp (AMX-INT8 or VNNI; without either, dequantized slices + BLAS above A8_BLOCK_MAX_ROWS).

    The LM head of `w4a8` mode, so that a whole w4a8 decode step runs on integer dot products and a Q8_0
    embedding is used as stored (the per-channel int8 head re-rounds it); and, under `auto`, every decoder
    linear stored at 5-8 bits (Q5_*, Q6_K, Q8_0: quantization/auto.py). Measured against the per-channel
    int8 weight-only kernel it replaced there, 14 of Qwen2.5-1.5B's down projections at batch 1: 6.0 vs
    11.1 ms (the fp32 widening made that kernel compute-bound at ~18 GB/s)."""

    name = "w8a8-g32"

    def process_weights_after_loading(self, layer: Linear) -> None:
        w = dense_weight(layer)
        if w.shape[1] % 32:
            raise ValueError(f"in_features {w.shape[1]} is not a multiple of 32, which block-32 int8 needs")
        q, scale = quantize_blocks32(w)
        drop_dense_weight(layer)
        layer.register_buffer("qweight", q)              # [out, in] int8
        layer.register_buffer("weight_scale", scale)     # [out, in / 32] float16

    def dequantize(self, layer: Linear) -> torch.Tensor:
        n, k = layer.qweight.shape
        return (layer.qweight.float().view(n, k // 32, 32) * layer.weight_scale.float()[..., None]).view(n, k)

    def decode_spec(self, layer: Linear) -> DecodeSpec:
        ops = cpu_kernels()
        gemv_rows = A8_BLOCK_GEMV_ROWS if ops is not None and ops.a8_gemm_path() != "none" else A8_BLOCK_MAX_ROWS
        return DecodeSpec("w8a8-g32", [layer.qweight, layer.weight_scale], layer.bias, max_rows=gemv_rows)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ops = cpu_kernels() if x.device.type == "cpu" else None
        gemm = ops is not None and ops.a8_gemm_path() != "none"
        if ops is not None and x2.dtype == torch.float32 and \
                x2.shape[0] <= (A8_BLOCK_GEMV_ROWS if gemm else A8_BLOCK_MAX_ROWS):
            y = ops.int8_a8_linear(x2.contiguous(), layer.qweight, layer.weight_scale)
        elif gemm and x2.dtype == torch.float32:
            y = ops.int8_a8_gemm(x2.contiguous(), layer.qweight, layer.weight_scale)
        else:
            q, scale = layer.qweight, layer.weight_scale

            def rows(n0: int, n1: int, out: torch.Tensor) -> None:
                k = q.shape[1]
                torch.mul(q[n0:n1].view(n1 - n0, k // 32, 32).float(), scale[n0:n1, :, None].float(),
                          out=out.view(n1 - n0, k // 32, 32))

            y = sliced_linear(x2.float(), q.shape[0], layer.bias, rows).to(x.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])
        if layer.bias is not None:
            y += layer.bias
        return y.view(*x.shape[:-1], y.shape[-1])

    def reference(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """What apply computes for small inputs (int4.py: a8_reference)."""
        return a8_reference(x, self.dequantize(layer), layer.bias)
