"""Typed reads of GGUF metadata and the tensor-shape checks that turn a corrupt field into a one-line error.

weights/gguf_file.py guarantees the container is well formed (every count, string and tensor lies inside
the file); this module guarantees the values mean something before weights/gguf.py builds a ModelConfig
from them: integers are integers in range, floats are finite, strings are strings, and every tensor the
model uses has the shape the config implies. Nothing is allocated from a metadata value before it is
checked against the tensors (whose sizes the file bounds), so a flipped bit in `block_count` or
`embedding_length` fails here instead of in a huge allocation or a reshape deep in the loader.
"""
from __future__ import annotations

from scaleinfer.errors import WeightLoadError
from scaleinfer.models.gguf_config import _MAX_ID, MAX_CONTEXT, _corrupt, _show, meta_float, meta_int, meta_str  # noqa: F401

# ---- tensor shapes ----------------------------------------------------------------------------------
def _expected_layer_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """GGUF layer tensor name (after blk.N.) -> HF shape, for every name any supported family uses."""
    h, q, kv, ffn = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    norms = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm")
    return {
        **{f"{n}.weight": (h,) for n in norms},
        "attn_q_norm.weight": (cfg.head_dim,), "attn_k_norm.weight": (cfg.head_dim,),
        "attn_q.weight": (q, h), "attn_k.weight": (kv, h), "attn_v.weight": (kv, h),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
        "attn_output.weight": (h, q),
        "ffn_gate.weight": (ffn, h), "ffn_up.weight": (ffn, h), "ffn_down.weight": (h, ffn),
    }


def check_shapes(path: str, tensors: dict, cfg) -> None:
    """Every model tensor has the shape `cfg` implies, and the file holds exactly cfg.num_layers layers."""
    if cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise WeightLoadError(f"{path}: {cfg.num_heads} attention heads, {cfg.num_kv_heads} KV heads and head "
                              f"size {cfg.head_dim} do not fit together (heads must be a multiple of KV heads, "
                              f"head size even); the file is corrupt")
    expected = {"token_embd.weight": (cfg.vocab_size, cfg.hidden_size),
                "output.weight": (cfg.vocab_size, cfg.hidden_size), "output_norm.weight": (cfg.hidden_size,)}
    layer_shapes = _expected_layer_shapes(cfg)
    layers = set()
    for name, info in tensors.items():
        want = expected.get(name)
        if name.startswith("blk."):
            index, _, rest = name[4:].partition(".")
            if not index.isdigit() or int(index) >= cfg.num_layers:
                raise WeightLoadError(f"{path} has tensor {_show(name)} but block_count is {cfg.num_layers}; the file "
                                      f"is corrupt")
            layers.add(int(index))
            want = layer_shapes.get(rest)
        if want is not None and tuple(info.shape) != want:
            raise WeightLoadError(f"{path}: tensor {name} has shape {tuple(info.shape)}, but the metadata implies "
                                  f"{want}; the file is corrupt")
    if len(layers) != cfg.num_layers:
        missing = min(set(range(cfg.num_layers)) - layers)
        raise WeightLoadError(f"{path} declares {cfg.num_layers} layers (block_count) but has no tensors for "
                              f"layer {missing}; the file is incomplete or corrupt")


# ---- tokenizer fields -------------------------------------------------------------------------------
_TOKENIZER_LISTS = {"tokenizer.ggml.tokens": (str,), "tokenizer.ggml.merges": (str,),
                    "tokenizer.ggml.token_type": (int,), "tokenizer.ggml.scores": (int, float)}
_TOKENIZER_STRINGS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")


def check_tokenizer_fields(path: str, fields: dict) -> dict:
    """The tokenizer.* fields, each of the type the tokenizer expects (lists of str / int / float, ids, flags)."""
    for key, value in fields.items():
        if key in _TOKENIZER_LISTS:
            kinds = _TOKENIZER_LISTS[key]
            if not isinstance(value, list) or not all(isinstance(v, kinds) and not isinstance(v, bool)
                                                      for v in value):
                raise _corrupt(path, key, value, f"a list of {' or '.join(k.__name__ for k in kinds)}")
        elif key in _TOKENIZER_STRINGS and not isinstance(value, str):
            raise _corrupt(path, key, value, "a string")
        elif key.endswith("_token_id") and (isinstance(value, bool) or not isinstance(value, int)
                                            or not 0 <= value <= _MAX_ID):
            raise _corrupt(path, key, value, f"a token id from 0 to {_MAX_ID}")
        elif key.startswith("tokenizer.ggml.add_") and not isinstance(value, bool):
            raise _corrupt(path, key, value, "a boolean")
    return fields
