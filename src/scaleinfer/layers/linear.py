"""Linear layers whose matmul is delegated to a swappable method (quantization is applied from outside).

A model declares `Linear(in, out)` or a fused `MergedLinear(in, [out_a, out_b, ...])`; the weight
loader fills the named shards. `quant_method` decides how the weight is stored and multiplied; the
default keeps a dense weight and calls F.linear. A quantization method replaces it after loading.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.layers.fused import fused_ops


def is_column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) == w.shape[0]


class LinearMethod(Protocol):
    def process_weights_after_loading(self, layer: "Linear") -> None: ...

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor: ...


class DecodeSpec(NamedTuple):
    """How the C++ decode step (kernels/csrc/decode_step.cpp) runs a linear exactly as `apply` does
    on CPU float32 inputs of up to `max_rows` rows: the kernel kind (dense, f32, int8, int4, w4a8, w8a8-g32), its
    tensors, the bias and the int4 group size (f32: the rows up to which f32_linear is used). A method without `decode_spec` keeps the Python path.
    Kind "split" (quantization/mixed.py: RowSplit) has no tensors of its own: its `parts` are the specs of
    bands of output rows, side by side, and its bias is added after them."""
    kind: str
    tensors: list
    bias: "torch.Tensor | None"
    group: int = 0
    max_rows: int = 1 << 30
    parts: tuple = ()


F32_KERNEL_MAX_ROWS = 4
"""Inputs of at most this many rows (decode) take our fp32 kernel on CPU; more rows go to BLAS. With AVX-512
the kernel takes up to F32_KERNEL_MAX_ROWS_AVX512 (f32_kernel_max_rows)."""
F32_KERNEL_MAX_ROWS_AVX512 = 32
"""The same with AVX-512 (decode batches, verification rows, beams): there the kernel reads each weight
vector once for four input rows (and each input vector for two weight rows from 8 rows on), four FMA chains
per pair, and BLAS on a row-major weight is slow at few rows. Measured (2 threads, AMD EPYC): whisper-base's
[51865, 512] head at 4 / 16 / 32 rows 3.8 / 10.7 / 16.7 ms against BLAS 17.7 / 20.2 / 26.8; on 3-4 MB weights
(896x896 ... 2048x512) the kernel was ahead of BLAS at every row count up to 32 (0.37-0.49 vs 0.42-0.64 ms at
32). The AVX2 kernel keeps one chain per dot and loses to BLAS past ~4 rows on weights that fit in the cache."""


@functools.lru_cache(maxsize=None)
def f32_kernel_max_rows(ops) -> int:
    """The most input rows the fp32 kernel of `ops` (kernels module) takes: by the best ISA level the CPU runs,
    read once (not a call into the module per linear per step)."""
    return F32_KERNEL_MAX_ROWS_AVX512 if ops.isas()[-1].startswith("avx512") else F32_KERNEL_MAX_ROWS


def _f32_ops(w: torch.Tensor):
    """The kernel module when `w` (float32, CPU) can use f32_linear, else None."""
    ops = fused_ops(w)
    return ops if ops is not None and hasattr(ops, "f32_linear") else None


class DenseLinearMethod:
    """y = x W^T + b with the dense weight (the reference every quantized method is checked against).

    On CPU in fp32 with the kernels built, W [out, in] stays row-major and decode-sized inputs (up to
    f32_kernel_max_rows: 32 rows with AVX-512, else 4) take our kernel (kernels/csrc/cpu_ops.cpp: f32_linear: up to four input rows
    per weight read, software prefetch), larger ones BLAS. Elsewhere (GPU, bf16, no compiler) W is
    stored column-major (a transposed view of a contiguous [in, out] tensor), which BLAS's GEMV reads
    ~1.35x faster than a row-major one at M = 1 (30 layers of SmolLM2-135M, 2 threads: 18.5 -> 13.8 ms).
    Row-major also lets a tied LM head share the embedding's storage instead of a transposed copy.
    """

    def process_weights_after_loading(self, layer: "Linear") -> None:
        w = layer.weight
        if _f32_ops(w) is not None:
            if not w.is_contiguous():
                layer.weight = nn.Parameter(w.data.contiguous(), requires_grad=False)
        elif not is_column_major(w):  # e.g. an LM head tied to the (row-major) embedding
            layer.weight = nn.Parameter(w.data.t().contiguous().t(), requires_grad=False)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        w = layer.weight
        ops = _f32_ops(w) if x.dim() >= 2 and w.is_contiguous() and x.dtype == w.dtype else None
        if ops is not None and x.numel() <= f32_kernel_max_rows(ops) * x.shape[-1]:
            y = ops.f32_linear(x.reshape(-1, x.shape[-1]).contiguous(), w, layer.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, w, layer.bias)

    def decode_spec(self, layer: "Linear") -> DecodeSpec:
        w = layer.weight
        ops = _f32_ops(w) if w.is_contiguous() else None
        if ops is not None:  # f32_linear up to `group` rows, then at::linear
            return DecodeSpec("f32", [w], layer.bias, f32_kernel_max_rows(ops))
        return DecodeSpec("dense", [w], layer.bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Uninitialised on purpose: every element is overwritten by the weight loader. Allocated
        # column-major (see DenseLinearMethod) so loading writes straight into the final layout.
        self.weight = nn.Parameter(torch.empty(in_features, out_features, dtype=dtype).t(), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.quant_method: LinearMethod = DenseLinearMethod()
        self.packed_shards: dict[int, object] = {}
        """Weights that arrived already quantized (e.g. a GGUF Q4_1 tensor), by shard (0 for a plain
        Linear); the quantization method adopts them (Int4WeightOnly.adopt_packed) or they are
        dequantized into the dense weight (materialize_packed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def shard_bounds(self) -> list[tuple[int, int]]:
        """Output rows [start, stop) of each shard (one shard for a plain Linear)."""
        return [(0, self.out_features)]

    def materialize_packed(self, keep: bool = False) -> None:
        """Dequantize packed shards into the dense weight (for methods that cannot adopt them); `keep` leaves
        the shards in place too (GPTQ's forward passes need the dense weight, its methods adopt the shards)."""
        bounds = self.shard_bounds()
        for shard, packed in self.packed_shards.items():
            start, stop = bounds[shard]
            self.weight.data[start:stop].copy_(packed.dequantize())
        if not keep:
            self.packed_shards = {}

    def load_shard(self, shard: int | None, name: str, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (`name` is "weight" or "bias") into this layer; a weight that is not a
        tensor is a packed one (see `packed_shards`) and is kept as it came."""
        if name == "weight" and not isinstance(tensor, torch.Tensor):
            self._keep_packed(shard or 0, tensor)
            return
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise KeyError(f"layer has no {name}")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit {name} of shape {tuple(target.shape)}")
        target.data.copy_(tensor)

    def _keep_packed(self, shard: int, packed) -> None:
        start, stop = self.shard_bounds()[shard]
        if tuple(packed.shape) != (stop - start, self.in_features):
            raise ValueError(f"shape {tuple(packed.shape)} does not fit shard {shard} of shape "
                             f"{(stop - start, self.in_features)}")
        self.packed_shards[shard] = packed

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input fused into one matmul (QKV, gate+up).

    Shard i occupies output rows offsets[i]:offsets[i+1].
    `shard_names` (e.g. "q", "k", "v") let quantization treat a shard on its own (quantization/mixed.py).
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool = False, dtype: torch.dtype = torch.float32,
                 shard_names: tuple[str, ...] = ()):
        super().__init__(in_features, sum(shard_sizes), bias, dtype)
        if shard_names and len(shard_names) != len(shard_sizes):
            raise ValueError(f"{len(shard_names)} shard names for {len(shard_sizes)} shards")
        self.shard_sizes = list(shard_sizes)
        self.shard_names = tuple(shard_names)
        self.offsets = [0]
        for size in shard_sizes:
            self.offsets.append(self.offsets[-1] + size)

    def shard_bounds(self) -> list[tuple[int, int]]:
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    def load_shard(self, shard: int | None, name: str, tensor: torch.Tensor) -> None:
        if shard is None or (name == "weight" and not isinstance(tensor, torch.Tensor)):
            return super().load_shard(shard, name, tensor)
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise KeyError(f"layer has no {name}")
        rows = target.data[self.offsets[shard]:self.offsets[shard + 1]]
        if tuple(tensor.shape) != tuple(rows.shape):
            raise ValueError(f"shape {tuple(tensor.shape)} does not fit shard {shard} of shape {tuple(rows.shape)}")
        rows.copy_(tensor)
