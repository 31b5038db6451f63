"""GGUF metadata -> ModelConfig and GGUF tensor names -> HF names, per family; models/registry.py names them.

weights/gguf.py parses the file and hands a family's reader a GGUFMetadata view. All families read the
same llama.cpp keys (`{arch}.embedding_length`, ...); Gemma 3 adds its local/global layout.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError


@dataclass(frozen=True)
class GGUFMetadata:
    """What a family's GGUF reader sees of a file."""

    path: str
    arch: str
    """general.architecture"""
    fields: Mapping[str, object]
    """Every metadata key -> value."""
    tensor_shapes: Mapping[str, tuple[int, ...]]
    """GGUF tensor name -> shape in HF layout ([out, in])."""
    rope_scaling: Callable[[int, float], dict | None]
    """(head_dim, rope_theta) -> HF-style rope_scaling from the llama.cpp keys (or Llama 3's rope_freqs)."""

    def get(self, key: str, default=None):
        """The value of a full metadata key (as GGUFFile.get), for the typed readers below."""
        return self.fields.get(key, default)

    def key(self, name: str, default=None, required: bool = True):
        """`{arch}.{name}`; a missing required key is a WeightLoadError naming it."""
        value = self.fields.get(f"{self.arch}.{name}", default)
        if value is None and required:
            raise WeightLoadError(f"{self.path} lacks the GGUF metadata key {self.arch}.{name}; the file is "
                                  f"incomplete or not a model")
        return value


# ---- typed metadata reads: a corrupt field is a one-line error, never a huge allocation ----------------
MAX_CONTEXT = 1 << 22
"""Largest context_length accepted (4M positions; real models declare 2k-1M). The RoPE tables are
built for the whole context, so a corrupt value must not reach them."""
_MAX_ID = (1 << 32) - 1


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _corrupt(path: str, key: str, value, expected: str) -> WeightLoadError:
    return WeightLoadError(f"{path}: GGUF metadata {key} is {_show(value)}, expected {expected}; the file is "
                           f"corrupt or not a model")


def meta_int(gf, key: str, default=None, *, required: bool = True, low: int = 1, high: int = 1 << 31) -> int | None:
    """An integer metadata value in [low, high]; `default` when absent; an error when absent and required."""
    value = gf.get(key, default)
    if value is None:
        if required:
            raise WeightLoadError(f"{gf.path} lacks the GGUF metadata key {key}; the file is incomplete or not "
                                  f"a model")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _corrupt(gf.path, key, value, f"an integer from {low} to {high}")
    return value


def meta_float(gf, key: str, default=None, *, required: bool = True, positive: bool = False) -> float | None:
    """A finite number (int or float) as a float; `default` when absent."""
    value = gf.get(key, default)
    if value is None:
        if required:
            raise WeightLoadError(f"{gf.path} lacks the GGUF metadata key {key}; the file is incomplete or not "
                                  f"a model")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise _corrupt(gf.path, key, value, "a finite positive number" if positive else "a finite number")
    return float(value)


def meta_str(gf, key: str) -> str | None:
    value = gf.get(key)
    if value is not None and not isinstance(value, str):
        raise _corrupt(gf.path, key, value, "a string")
    return value



LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
"""Per-layer tensor names (after `blk.N.`) of the Llama family, Qwen2 and Mistral -> HF (after `model.layers.N.`)."""
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
"""Gemma 3: `ffn_norm` is the pre-feedforward norm, plus post-attention / post-feedforward and Q/K norms."""
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
"""Tensors outside the layers, the same in every family."""


def read_llama_cpp(meta: GGUFMetadata) -> ModelConfig:
    """The ModelConfig from the llama.cpp keys every decoder family uses: "llama" (Llama 1-3, SmolLM/SmolLM2,
    Mistral, TinyLlama) and "qwen2" (Qwen2, Qwen2.5) files read nothing else."""
    if len(meta.tensor_shapes.get("token_embd.weight", ())) != 2:
        raise WeightLoadError(f"{meta.path} has no two-dimensional token_embd.weight tensor; the file is incomplete "
                              f"or not a model")
    a = meta.arch
    hidden_size = meta_int(meta, f"{a}.embedding_length")
    num_heads = meta_int(meta, f"{a}.attention.head_count")
    head_dim = (meta_int(meta, f"{a}.attention.key_length", required=False)
                or meta_int(meta, f"{a}.rope.dimension_count", required=False) or hidden_size // num_heads)
    rope_theta = meta_float(meta, f"{a}.rope.freq_base", 10000.0, positive=True)
    eos = meta_int(meta, "tokenizer.ggml.eos_token_id", required=False, low=0, high=_MAX_ID)
    bos = meta_int(meta, "tokenizer.ggml.bos_token_id", required=False, low=0, high=_MAX_ID)
    return ModelConfig(
        architecture=meta.arch,
        # The embedding's rows, not the token list: a padded vocabulary still needs a logit per row.
        vocab_size=meta.tensor_shapes["token_embd.weight"][0],
        hidden_size=hidden_size,
        intermediate_size=meta_int(meta, f"{a}.feed_forward_length"),
        num_layers=meta_int(meta, f"{a}.block_count", high=1 << 16),
        num_heads=num_heads,
        num_kv_heads=meta_int(meta, f"{a}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=meta_int(meta, f"{a}.context_length", high=MAX_CONTEXT),
        rms_norm_eps=meta_float(meta, f"{a}.attention.layer_norm_rms_epsilon", positive=True),
        rope_theta=rope_theta,
        rope_scaling=meta.rope_scaling(head_dim, rope_theta),
        tie_word_embeddings="output.weight" not in meta.tensor_shapes,
        attention_bias="blk.0.attn_q.bias" in meta.tensor_shapes,
        bos_token_id=bos,
        eos_token_ids=(eos,) if eos is not None else (),
        name=str(meta.fields.get("general.name") or ""),
    )


def read_gemma3(meta: GGUFMetadata) -> ModelConfig:
    """Gemma 3's fields, read the way llama.cpp reads them (src/llama-model.cpp)."""
    base = read_llama_cpp(meta)
    window = meta_int(meta, f"{meta.arch}.attention.sliding_window", required=False)
    if not window:
        raise WeightLoadError(f"{meta.path} lacks the GGUF metadata key {meta.arch}.attention.sliding_window; the "
                              f"file is incomplete")
    if meta.key("attn_logit_softcapping", required=False):
        raise UnsupportedModelError(f"{meta.path} sets attention logit soft-capping, which is not supported")
    num_layers = base.num_layers
    # Every `pattern`-th layer is global; newer files may store the per-layer flags (True = sliding).
    pattern = meta.key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != num_layers or not all(isinstance(p, bool) for p in pattern):
            raise WeightLoadError(f"{meta.path}: {meta.arch}.attention.sliding_window_pattern has {len(pattern)} "
                                  f"entries for {num_layers} layers")
        layer_types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
    else:
        pattern = meta_int(meta, f"{meta.arch}.attention.sliding_window_pattern", 6, low=0)
        layer_types = tuple("full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention"
                            for i in range(num_layers))
    # llama.cpp: 27B (62 layers) scales queries by (hidden / heads) ** -0.5, the others by head_dim ** -0.5;
    # the SWA layers' RoPE base is 10000 unless the file says otherwise.
    scalar = base.hidden_size // base.num_heads if num_layers == 62 else base.head_dim
    softcap = meta_float(meta, f"{meta.arch}.final_logit_softcapping", required=False)
    return dataclasses.replace(
        base,
        sliding_window=window,
        layer_types=layer_types,
        query_pre_attn_scalar=float(scalar),
        rope_local_theta=meta_float(meta, f"{meta.arch}.rope.freq_base_swa", required=False, positive=True) or 10000.0,
        final_logit_softcapping=float(softcap) if softcap else None,
        hidden_activation="gelu_pytorch_tanh",
    )
