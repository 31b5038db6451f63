"""The Llama family (Llama 2/3, SmolLM2, Mistral): pre-norm decoder, RMSNorm, RoPE, SwiGLU, GQA.

References: Touvron et al. 2023 (Llama), HF transformers `modeling_llama.py` (the parity oracle).
Q/K/V and gate/up are fused into single matmuls; the checkpoint's separate tensors are loaded into
shards of the fused weights (see `_STACKED`). Qwen2 is this model with Q/K/V biases (qwen2.py).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.backend import AttentionBackend
from scaleinfer.attention.layer import Attention
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.attention.patterns import CAUSAL, AttentionPattern
from scaleinfer.attention.sdpa import kernel_kv_args
from scaleinfer.config import ModelConfig
from scaleinfer.layers.activation import silu_and_mul
from scaleinfer.layers.linear import Linear, MergedLinear
from scaleinfer.layers.norm import RMSNorm
from scaleinfer.layers.rotary import RotaryEmbedding, apply_rotary_

# checkpoint projection name -> (fused module name, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [q_size, kv_size, kv_size], cfg.attention_bias, dtype,
                                     shard_names=("q", "k", "v"))
        self.o_proj = Linear(q_size, cfg.hidden_size, False, dtype)
        # Mistral's config sets a sliding window for every layer: attention and KV follow it.
        pattern = AttentionPattern.sliding_window(cfg.sliding_window) if cfg.sliding_window else CAUSAL
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim ** -0.5, backend, pattern)

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        h, h_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                  # [n, (h + 2 * h_kv) * d]
        # Q and K sit side by side in the fused output: rotate them in one go, in place.
        qk = apply_rotary_(qkv[:, :(h + h_kv) * d].view(n, h + h_kv, d), cos, sin)
        q, k = qk.split([h, h_kv], dim=1)                       # [n, h, d], [n, h_kv, d] (views)
        v = qkv[:, (h + h_kv) * d:].view(n, h_kv, d)
        out = self.attn(q, k, v, kv_cache, meta)                # [n, h, d]
        return self.o_proj(out.view(n, h * d))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, False, dtype,
                                         shard_names=("gate", "up"))
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, backend, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


def _program_linear(spec) -> tuple:
    """A DecodeSpec as DecodeProgram.add_layer takes a linear: ([(kind, tensors, group), ...], bias)."""
    return [(p.kind, p.tensors, p.group) for p in (spec.parts or (spec,))], spec.bias


class _DecodePlan:
    """A decode-only step of the Llama family as a flat loop over the fused CPU kernels (layers/fused.py,
    quantization/csrc/): the same kernels, in the same order, as the modules' forward (so the logits
    are bit-identical, tested), minus the nn.Module dispatch, shape checks and views that cost as much
    as the matmuls of a 135M model at batch 1. Where every linear's method gives a `decode_spec`, the
    whole layer loop runs in one C++ call (csrc/decode_step.cpp: DecodeProgram); otherwise, or for more
    rows than a spec takes, it runs from Python. Built once per model and KV cache (float32, float16,
    bfloat16 or int8 K/V: attention/sdpa.py: kernel_kv_args); it re-checks the quantization methods, so a
    method swapped in later is used as is. A step it does not cover (prefill, sink shifts, another dtype
    or device) takes the module path."""

    def __init__(self, ops, layers, dims, caches):
        self.ops, self.layers = ops, layers
        self.h, self.h_kv, self.d, self.eps = dims
        self.caches = caches
        self.kv = [kernel_kv_args(k, v) for k, v in caches]   # (k, v, k_scale, v_scale, k_chan, v_chan)
        self.layer_patterns = [layer[6].pattern for layer in layers]
        self.patterns = list(dict.fromkeys(self.layer_patterns))  # one attention view per distinct pattern
        self.view_of = [self.patterns.index(p) for p in self.layer_patterns]
        self.linears = [layer[i] for layer in layers for i in (1, 2, 4, 5)]  # qkv, o, gate_up, down
        self.methods = [lin.quant_method for lin in self.linears]  # what the plan was built with
        self.program, self.max_rows = self._compile()

    @classmethod
    def build(cls, model, kv_caches) -> "_DecodePlan | bool":
        from scaleinfer.attention.sdpa import CpuPagedBackend
        from scaleinfer.layers.fused import fused_ops

        first = model.layers[0]
        ops = fused_ops(model.norm.weight)
        if ops is None or not isinstance(first.self_attn.attn.backend, CpuPagedBackend) \
                or any(kernel_kv_args(*c) is None for c in kv_caches):
            return False
        layers = [(layer.input_layernorm.weight, layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                   layer.post_attention_layernorm.weight, layer.mlp.gate_up_proj, layer.mlp.down_proj,
                   layer.self_attn.attn) for layer in model.layers]
        a = first.self_attn
        return cls(ops, layers, (a.num_heads, a.num_kv_heads, a.head_dim, first.input_layernorm.eps),
                   [tuple(c) for c in kv_caches])

    def _compile(self):
        """The C++ program for the layer loop and the most rows all its linears take, or (None, 0)."""
        if not hasattr(self.ops, "DecodeProgram"):
            return None, 0
        if not all(hasattr(m, "decode_spec") for m in self.methods):
            return None, 0
        program = self.ops.DecodeProgram(self.h, self.h_kv, self.d, self.eps)
        max_rows = 1 << 30
        for (w_in, qkv, o, w_post, gate_up, down, attn), (k, v, *scales), view in zip(
                self.layers, self.kv, self.view_of):
            specs = [lin.quant_method.decode_spec(lin) for lin in (qkv, o, gate_up, down)]
            if any(s is None for s in specs):
                return None, 0
            max_rows = min([max_rows] + [s.max_rows for s in specs])
            program.add_layer(w_in, w_post, k, v, attn.scale, view, *map(_program_linear, specs), *scales)
        return program, max_rows

    def current(self, kv_caches) -> bool:
        """Whether this plan was built for these caches and the layers' present methods and patterns."""
        return len(kv_caches) == len(self.caches) and all(
            c[0] is k and c[1] is v for c, (k, v) in zip(kv_caches, self.caches)) and \
            all(lin.quant_method is m for lin, m in zip(self.linears, self.methods)) and \
            all(layer[6].pattern is p for layer, p in zip(self.layers, self.layer_patterns))

    def run(self, model, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices):
        views = [meta.for_pattern(p) for p in self.patterns]
        if any(v.decode_sink_shift is not None or v.decode_lens is None for v in views):
            return None
        x = model.embed_tokens(input_ids)
        n = x.shape[0]
        cos, sin = model.rotary.lookup(positions, x.dtype)
        if self.program is not None and n <= self.max_rows:
            x, residual = self.program.run(x, cos, sin, [v.slot_mapping for v in views],
                                           [v.decode_slots for v in views], [v.decode_lens for v in views])
            return model.compute_head(x, residual, logits_indices)
        ops, h, h_kv, d, eps = self.ops, self.h, self.h_kv, self.d, self.eps
        out = torch.empty(n, h, d)
        residual = None
        for (w_in, qkv_proj, o_proj, w_post, gate_up_proj, down_proj, attn), (k_cache, v_cache, *scales), i in zip(
                self.layers, self.kv, self.view_of):
            m = views[i]
            x, residual = ops.add_rms_norm(x, residual, w_in, eps)
            qkv = qkv_proj.quant_method.apply(qkv_proj, x)
            ops.rotary_(qkv[:, :(h + h_kv) * d].view(n, h + h_kv, d), cos, sin)
            ops.kv_write(k_cache, v_cache, m.slot_mapping, qkv[:, h * d:(h + h_kv) * d].view(n, h_kv, d),
                         qkv[:, (h + h_kv) * d:].view(n, h_kv, d), *scales)
            ops.paged_decode_attention(out, qkv[:, :h * d].view(n, h, d), k_cache, v_cache, m.decode_slots,
                                       m.decode_lens, attn.scale, *scales)
            x = o_proj.quant_method.apply(o_proj, out.view(n, h * d))
            x, residual = ops.add_rms_norm(x, residual, w_post, eps)
            x = down_proj.quant_method.apply(down_proj, ops.silu_and_mul(
                gate_up_proj.quant_method.apply(gate_up_proj, x)))
        return model.compute_head(x, residual, logits_indices)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, _weight=torch.empty(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        for layer in self.layers:
            layer.self_attn.attn.set_rope(self.rotary.inv_freq)
        if cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype)

    lean_decode = True
    """Run decode-only steps through _DecodePlan (same kernels, no per-module Python); tests switch it off
    to compare."""
    _decode_plan = None

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, logits_indices) -> torch.Tensor:
        if self.lean_decode and not meta.prefills and meta.num_decode_tokens == input_ids.shape[0]:
            if self._decode_plan is None or (self._decode_plan and not self._decode_plan.current(kv_caches)):
                self._decode_plan = _DecodePlan.build(self, kv_caches)
            if self._decode_plan:
                logits = self._decode_plan.run(self, input_ids, positions, kv_caches, meta, logits_indices)
                if logits is not None:
                    return logits
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        cos, sin = self.rotary.lookup(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.compute_head(x, residual, logits_indices)

    @torch.no_grad()
    def key_channel_scales(self, strength: float = 0.5) -> list[torch.Tensor]:
        """Per layer, [num_kv_heads, head_dim] divisors for int8 keys (quantization/kv_int8.py), from the
        weights alone: channel c of k = W_k (g * n) + b_k, with n the RMS-normalized input (unit RMS),
        has magnitude about sqrt(b_c^2 + sum_j (W_cj g_j)^2); RoPE mixes channels i and i + D/2, so a
        pair shares the root of their summed squares; the divisor is that to the power `strength`."""
        out = []
        for layer in self.layers:
            a = layer.self_attn
            h, h_kv, d = a.num_heads, a.num_kv_heads, a.head_dim
            qkv = a.qkv_proj
            w = qkv.weight if qkv.weight is not None else qkv.quant_method.dequantize(qkv)
            w_k = w[h * d:(h + h_kv) * d].float() * layer.input_layernorm.weight.float()[None, :]
            sq = (w_k * w_k).sum(dim=1)
            if qkv.bias is not None:
                sq = sq + qkv.bias[h * d:(h + h_kv) * d].float() ** 2
            sq = sq.view(h_kv, d)
            pair = (sq[:, :d // 2] + sq[:, d // 2:]).sqrt().clamp(min=1e-6)
            out.append(torch.cat([pair, pair], dim=1) ** strength)
        return out

    def compute_head(self, x, residual, logits_indices) -> torch.Tensor:
        # Only the rows that need logits go through the final norm and the LM head.
        x = x.index_select(0, logits_indices)
        residual = residual.index_select(0, logits_indices)
        x, _ = self.norm(x, residual)
        return self.lm_head(x).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named checkpoint tensors into the (fused) parameters; returns the names loaded."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            path = name.removeprefix("model.")
            module_path, _, param = path.rpartition(".")
            owner, _, leaf = module_path.rpartition(".")
            shard = None
            if leaf in _STACKED:
                fused, shard = _STACKED[leaf]
                module_path = f"{owner}.{fused}"
            module = modules.get(module_path)
            if module is None:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if isinstance(module, Linear):
                module.load_shard(shard, param, tensor)
            else:
                getattr(module, param).data.copy_(tensor)
            loaded.add(name)
        return loaded
