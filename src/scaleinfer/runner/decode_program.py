"""The decode program: a decode-only step of a Llama-shaped decoder as one flat loop over the CPU kernels.

Built by the ModelRunner from the typed layer weights a family exposes (`model.decode_layers()`,
models/interface.py: DecoderWeights). It runs the same kernels, in the same order, as the modules'
forward (layers/fused.py, the C++ library), so the logits are bit-identical (tests/engine/
test_lean_decode.py), minus the nn.Module dispatch, shape checks and views that cost as much as the
matmuls of a 135M model at batch 1. Where every linear's method gives a `decode_spec`, the whole layer
loop is one C++ call (csrc/decode_step.cpp: DecodeProgram); otherwise, or for more rows than a spec
takes, it loops in Python. The module path (`model.forward`) stays the reference and takes every step
the program does not cover: prefill, a family without `decode_layers`, another dtype or device,
another attention backend, sink shifts. KV caches of float32, float16, bfloat16 or int8 (attention/sdpa.py:
kernel_kv_args) are read and written by the kernels themselves.
"""
from __future__ import annotations

import torch

from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.attention.sdpa import CpuPagedBackend, kernel_kv_args
from scaleinfer.layers.fused import fused_ops
from scaleinfer.layers.parallel import RowParallel
from scaleinfer.models.interface import DecoderWeights


def _program_linear(spec) -> tuple:
    """A DecodeSpec as DecodeProgram.add_layer takes a linear: ([(kind, tensors, group), ...], bias)."""
    return [(p.kind, p.tensors, p.group) for p in (spec.parts or (spec,))], spec.bias


class DecodePlan:
    """The decode program for one model and one set of KV caches. `build` returns None where a step of
    this model on these caches can never take it; `current` says whether the quantization methods,
    caches and attention patterns it was built with are still the model's (the runner rebuilds
    otherwise); `run` returns None for a step it does not cover (the runner then calls model.forward)."""

    def __init__(self, ops, weights: DecoderWeights, caches):
        self.ops, self.weights = ops, weights
        self.layers = weights.layers
        self.h, self.h_kv, self.d, self.eps = weights.num_heads, weights.num_kv_heads, weights.head_dim, weights.eps
        self.caches = caches
        self.kv = [kernel_kv_args(k, v) for k, v in caches]   # (k, v, k_scale, v_scale, k_chan, v_chan)
        self.layer_patterns = [layer.attn.pattern for layer in self.layers]
        self.patterns = list(dict.fromkeys(self.layer_patterns))  # one attention view per distinct pattern
        self.view_of = [self.patterns.index(p) for p in self.layer_patterns]
        self.linears = [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.methods = [lin.quant_method for lin in self.linears]  # what the plan was built with
        self.program, self.max_rows = self._compile()

    @classmethod
    def build(cls, model, kv_caches) -> "DecodePlan | None":
        """The plan for `model` on `kv_caches`, or None: a family without `decode_layers`, no CPU
        kernels for its dtype / device, another attention backend, or caches the kernels cannot read."""
        if not hasattr(model, "decode_layers"):
            return None
        weights: DecoderWeights = model.decode_layers()
        ops = fused_ops(weights.layers[0].input_norm)
        if ops is None or not isinstance(weights.layers[0].attn.backend, CpuPagedBackend) \
                or any(kernel_kv_args(*c) is None for c in kv_caches):
            return None
        return cls(ops, weights, [tuple(c) for c in kv_caches])

    def _compile(self):
        """The C++ program for the layer loop and the most rows all its linears take, or (None, 0)."""
        if not hasattr(self.ops, "DecodeProgram"):
            return None, 0
        if not all(hasattr(m, "decode_spec") for m in self.methods):
            return None, 0
        program = self.ops.DecodeProgram(self.h, self.h_kv, self.d, self.eps)
        max_rows = 1 << 30
        for layer, (k_cache, v_cache, *scales), view in zip(self.layers, self.kv, self.view_of):
            linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
            specs = [lin.quant_method.decode_spec(lin) for lin in linears]
            if any(s is None for s in specs):
                return None, 0
            max_rows = min([max_rows] + [s.max_rows for s in specs])
            program.add_layer(layer.input_norm, layer.post_norm, k_cache, v_cache, layer.attn.scale, view,
                              *map(_program_linear, specs), *scales)
        reduce = self._all_reduce()
        if reduce is not None:   # tensor parallel: o and down are row-parallel (layers/parallel.py)
            program.set_all_reduce(reduce)
        return program, max_rows

    def _all_reduce(self):
        """The communicator's reducer when o and down are row-parallel (all layers alike), else None."""
        methods = [m for layer in self.layers for m in (layer.o.quant_method, layer.down.quant_method)]
        if not any(isinstance(m, RowParallel) for m in methods):
            return None
        assert all(isinstance(m, RowParallel) and m.comm is methods[0].comm for m in methods), \
            "tensor parallelism shards every layer's o and down alike"
        return methods[0].comm.reducer()

    def current(self, kv_caches) -> bool:
        """Whether this plan was built for these caches and the layers' present methods and patterns."""
        return len(kv_caches) == len(self.caches) and all(
            c[0] is k and c[1] is v for c, (k, v) in zip(kv_caches, self.caches)) and \
            all(lin.quant_method is m for lin, m in zip(self.linears, self.methods)) and \
            all(layer.attn.pattern is p for layer, p in zip(self.layers, self.layer_patterns))

    def run(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices):
        """The logits of a decode-only step, or None where a view needs sink shifts or lacks decode lengths."""
        out = self.run_layers(self.weights.embed(input_ids), positions, meta)
        return None if out is None else self.weights.head(*out, logits_indices)

    def run_layers(self, x, positions, meta: AttentionMetadata):
        """(x, residual) after the plan's layers for the input stream `x` (the embeddings, or what the
        previous pipeline stage sent), or None where a view needs sink shifts or lacks decode lengths."""
        views = [meta.for_pattern(p) for p in self.patterns]
        if any(v.decode_sink_shift is not None or v.decode_lens is None for v in views):
            return None
        cos, sin = self.weights.rope(positions, x.dtype)
        if self.program is not None and x.shape[0] <= self.max_rows:
            x, residual = self.program.run(x, cos, sin, [v.slot_mapping for v in views],
                                           [v.decode_slots for v in views], [v.decode_lens for v in views])
            return x, residual
        return self._loop(x, cos, sin, views)

    def _loop(self, x, cos, sin, views):
        """The layer loop from Python, kernel by kernel (the program's steps, for what it does not take)."""
        ops, h, h_kv, d, eps = self.ops, self.h, self.h_kv, self.d, self.eps
        n = x.shape[0]
        out = torch.empty(n, h, d)
        residual = None
        for layer, (k_cache, v_cache, *scales), i in zip(self.layers, self.kv, self.view_of):
            m = views[i]
            x, residual = ops.add_rms_norm(x, residual, layer.input_norm, eps)
            qkv = layer.qkv.quant_method.apply(layer.qkv, x)
            ops.rotary_(qkv[:, :(h + h_kv) * d].view(n, h + h_kv, d), cos, sin)
            ops.kv_write(k_cache, v_cache, m.slot_mapping, qkv[:, h * d:(h + h_kv) * d].view(n, h_kv, d),
                         qkv[:, (h + h_kv) * d:].view(n, h_kv, d), *scales)
            ops.paged_decode_attention(out, qkv[:, :h * d].view(n, h, d), k_cache, v_cache, m.decode_slots,
                                       m.decode_lens, layer.attn.scale, *scales)
            x = layer.o.quant_method.apply(layer.o, out.view(n, h * d))
            x, residual = ops.add_rms_norm(x, residual, layer.post_norm, eps)
            x = layer.down.quant_method.apply(layer.down, ops.silu_and_mul(
                layer.gate_up.quant_method.apply(layer.gate_up, x)))
        return x, residual
