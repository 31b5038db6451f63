"""GGUF reader: metadata -> ModelConfig, tensors -> HF-named float tensors, tokenizer fields.

The file is memory-mapped by the `gguf` package; tensors are dequantized one at a time with its
own `gguf.quants.dequantize`, so peak memory stays near the size of the model in the compute dtype.
llama.cpp's converter permutes the rows of Q and K for the "llama" architecture (it stores RoPE's
pairs interleaved); `_unpermute` restores HF's rotate-half layout so one model file serves both.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                   "Q2_K", "Q3_K")

_LAYER_NAMES = {
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
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def open_reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise WeightLoadError(f"model file not found: {path}; pass a catalog name (see `scaleinfer models`), "
                              f"a .gguf file or an HF model directory")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors ... on bad files
        raise WeightLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                              f"re-download it or check that the copy is complete") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > os.path.getsize(path):
        raise WeightLoadError(f"{path} is truncated: tensor data runs to byte {end} but the file has "
                              f"{os.path.getsize(path)}; re-download it")
    return reader


def field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_model_config(reader) -> ModelConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def key(name: str, default=None, required: bool = True):
        value = field_value(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise WeightLoadError(f"GGUF metadata lacks {arch}.{name}; the file is incomplete or not a model")
        return value

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else None))
    head_dim = int(key("attention.key_length", None, False) or key("rope.dimension_count", None, False)
                   or hidden // num_heads)
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    scaling = None
    scaling_type = key("rope.scaling.type", None, False)
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0, False)),
                   "original_max_position_embeddings": key("rope.scaling.original_context_length", None, False)}
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads, False)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0, False)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=str(field_value(reader, "general.name", "") or ""),
    )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, index, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{index}.{_LAYER_NAMES[rest]}"
    return None


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: interleaved RoPE pairs -> HF rotate-half halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy in [out, in] (HF) layout."""
    import gguf

    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"tensor {tensor.name} has GGUF type {type_name}, which is not supported; "
                                    f"supported: {', '.join(SUPPORTED_TYPES)}")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists ne[0] (innermost) first
    if type_name == "F32":
        return np.array(tensor.data, dtype=np.float32).reshape(shape)  # a copy: the mmap is read-only
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def iter_tensors(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            logger.debug("skipping GGUF tensor %s", tensor.name)
            continue
        try:
            data = dequantize(tensor)
        except (ValueError, IndexError, TypeError) as exc:
            raise WeightLoadError(f"cannot read tensor {tensor.name} ({exc}); the GGUF file is corrupt") from None
        if config.architecture == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _unpermute(data, config.num_heads)
        elif config.architecture == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _unpermute(data, config.num_kv_heads)
        yield name, torch.from_numpy(np.ascontiguousarray(data))


def tokenizer_fields(reader) -> dict:
    """Every tokenizer.* metadata field, as plain Python values."""
    return {k: field_value(reader, k) for k in reader.fields if k.startswith("tokenizer.")}
