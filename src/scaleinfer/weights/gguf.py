"""GGUF checkpoints: metadata -> ModelConfig, tensors -> HF-named float32 tensors, tokenizer fields.

Fed by weights/gguf_file.py (the parsed, memory-mapped container); feeds weights/loader.py.
Tensors are dequantized one at a time with the `gguf` package's own `gguf.quants.dequantize`, so
peak memory stays near the size of the model in float32 plus one tensor.

llama.cpp's converter permutes the rows of Q and K for the "llama" architecture (it stores each
head's RoPE pairs interleaved, GPT-J style); `unpermute_qk` restores HF's rotate-half layout so
the same model code serves GGUF and safetensors. Qwen2 and Gemma 3 files are written unpermuted.

Gemma 3 names its norms differently (`ffn_norm` is the pre-feedforward norm, plus post_attention_norm,
post_ffw_norm, attn_q_norm, attn_k_norm), and llama.cpp's converter stored every Gemma norm weight as
w + 1; `iter_tensors` subtracts the 1 so the tensors are HF's (as HF's Gemma2TensorProcessor does).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import UnsupportedModelError, WeightLoadError
from scaleinfer.weights.gguf_checks import (MAX_CONTEXT, check_shapes, check_tokenizer_fields, meta_float,
                                            meta_int, meta_str)
from scaleinfer.weights.gguf_file import GGUFFile, TensorInfo

logger = logging.getLogger(__name__)

PERMUTED_QK = {"llama": True, "qwen2": False, "gemma3": False}
"""Supported `general.architecture` values -> whether llama.cpp permuted their Q/K rows.
"llama" covers Llama 1-3, SmolLM/SmolLM2, Mistral and TinyLlama; "qwen2" covers Qwen2 and Qwen2.5;
"gemma3" covers the Gemma 3 text models."""
SUPPORTED_ARCHITECTURES = tuple(PERMUTED_QK)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
"""GGML tensor types we dequantize (all through gguf.quants)."""

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
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_ARCH_LAYER_NAMES = {"gemma3": _GEMMA3_LAYER_NAMES}
"""Per-architecture layer tensor names where they differ from llama's."""
_NORM_PLUS_ONE = ("gemma3",)
"""Architectures whose norm weights llama.cpp stored as w + 1."""
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str, arch: str | None = None) -> str | None:
    """The HF parameter name of a GGUF tensor of `general.architecture` arch, or None for tensors we
    do not load (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, index, rest = gguf_name.split(".", 2)
        names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
        if rest in names:
            return f"model.layers.{index}.{names[rest]}"
    return None


# ---- metadata -> ModelConfig ----------------------------------------------------------------------
def read_model_config(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig of a "llama", "qwen2" or "gemma3" GGUF; all use the same llama.cpp keys (Gemma 3
    adds its local/global layout, see `_gemma3_fields`)."""
    arch = gf.get("general.architecture")
    if not isinstance(arch, str) or arch not in PERMUTED_QK:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} in {gf.path} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in gf.tensors}
    if "token_embd.weight" not in tensors or len(tensors["token_embd.weight"].shape) != 2:
        raise WeightLoadError(f"{gf.path} has no two-dimensional token_embd.weight tensor; the file is incomplete "
                              f"or not a model")
    hidden_size = meta_int(gf, f"{arch}.embedding_length")
    num_heads = meta_int(gf, f"{arch}.attention.head_count")
    head_dim = (meta_int(gf, f"{arch}.attention.key_length", required=False)
                or meta_int(gf, f"{arch}.rope.dimension_count", required=False) or hidden_size // num_heads)
    rope_theta = meta_float(gf, f"{arch}.rope.freq_base", 10000.0, positive=True)
    eos = meta_int(gf, "tokenizer.ggml.eos_token_id", required=False, low=0, high=(1 << 32) - 1)
    bos = meta_int(gf, "tokenizer.ggml.bos_token_id", required=False, low=0, high=(1 << 32) - 1)
    num_layers = meta_int(gf, f"{arch}.block_count", high=1 << 16)
    extra = _gemma3_fields(gf, arch, num_layers, hidden_size, num_heads, head_dim) if arch == "gemma3" else {}
    config = ModelConfig(
        architecture=arch,
        # The embedding's rows, not the token list: a padded vocabulary still needs a logit per row.
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden_size,
        intermediate_size=meta_int(gf, f"{arch}.feed_forward_length"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=meta_int(gf, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=meta_int(gf, f"{arch}.context_length", high=MAX_CONTEXT),
        rms_norm_eps=meta_float(gf, f"{arch}.attention.layer_norm_rms_epsilon", positive=True),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(gf, arch, tensors, head_dim, rope_theta),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=bos,
        eos_token_ids=(eos,) if eos is not None else (),
        name=str(gf.get("general.name") or ""),
        **extra,
    )
    check_shapes(gf.path, tensors, config)
    return config


def _gemma3_fields(gf: GGUFFile, arch: str, num_layers: int, hidden_size: int, num_heads: int,
                   head_dim: int) -> dict:
    """Gemma 3's ModelConfig fields, read the way llama.cpp reads them (src/llama-model.cpp)."""
    window = meta_int(gf, f"{arch}.attention.sliding_window")
    if gf.get(f"{arch}.attn_logit_softcapping"):
        raise UnsupportedModelError(f"{gf.path} sets attention logit soft-capping, which is not supported")
    # Every `pattern`-th layer is global; newer files may store the per-layer flags (True = sliding).
    pattern = gf.get(f"{arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != num_layers or not all(isinstance(p, bool) for p in pattern):
            raise WeightLoadError(f"{gf.path}: {arch}.attention.sliding_window_pattern has {len(pattern)} "
                                  f"entries for {num_layers} layers")
        layer_types = tuple("sliding_attention" if p else "full_attention" for p in pattern)
    else:
        pattern = meta_int(gf, f"{arch}.attention.sliding_window_pattern", 6, low=0)
        layer_types = tuple("full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention"
                            for i in range(num_layers))
    # llama.cpp: 27B (62 layers) scales queries by (hidden / heads) ** -0.5, the others by head_dim ** -0.5;
    # the SWA layers' RoPE base is 10000 unless the file says otherwise.
    scalar = hidden_size // num_heads if num_layers == 62 else head_dim
    softcap = meta_float(gf, f"{arch}.final_logit_softcapping", required=False)
    return {
        "sliding_window": window,
        "layer_types": layer_types,
        "query_pre_attn_scalar": float(scalar),
        "rope_local_theta": meta_float(gf, f"{arch}.rope.freq_base_swa", required=False, positive=True) or 10000.0,
        "final_logit_softcapping": float(softcap) if softcap else None,
        "hidden_activation": "gelu_pytorch_tanh",
    }


def _rope_scaling(gf: GGUFFile, arch: str, tensors: dict[str, TensorInfo], head_dim: int,
                  theta: float) -> dict | None:
    """HF-style rope_scaling from `{arch}.rope.scaling.*` keys, or Llama 3's from its rope_freqs tensor."""
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling_from_factors(_dequantize(gf, tensors["rope_freqs.weight"]).reshape(-1),
                                            head_dim, theta, gf.path)
    kind = meta_str(gf, f"{arch}.rope.scaling.type")
    factor = (meta_float(gf, f"{arch}.rope.scaling.factor", required=False, positive=True)
              or meta_float(gf, f"{arch}.rope.scale_linear", required=False, positive=True))
    if kind is None and factor not in (None, 1.0):
        kind = "linear"  # older files: only rope.scale_linear
    if kind in (None, "none") or factor is None:
        return None
    scaling = {"rope_type": kind, "factor": factor}
    original = meta_int(gf, f"{arch}.rope.scaling.original_context_length", required=False, low=0,
                        high=MAX_CONTEXT)
    if original:
        scaling["original_max_position_embeddings"] = original
    if kind == "yarn":  # optional; convert_hf_to_gguf writes them from HF's rope_scaling when present
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                                 ("yarn_attn_factor", "attention_factor")):
            value = meta_float(gf, f"{arch}.rope.scaling.{gguf_key}", required=False)
            if value is not None:
                scaling[hf_key] = value
    return scaling


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors that Llama 3.1's rope scaling applies (what llama.cpp stores as rope_freqs)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, blended))


def _llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float, path: str) -> dict:
    """llama.cpp keeps only the computed factors; recover Llama 3's parameters and check they reproduce them."""
    if factors.shape != (head_dim // 2,) or not np.isfinite(factors).all() or factors.min() <= 0:
        raise UnsupportedModelError(f"{path} has a rope_freqs tensor of {factors.shape[0]} values that is not Llama "
                                    f"3's standard rope scaling; this RoPE variant is not supported")
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if factors.shape != (head_dim // 2,) or not np.allclose(llama3_rope_factors(scaling, head_dim, theta),
                                                            factors, rtol=1e-4):
        raise UnsupportedModelError(f"{path} has a rope_freqs tensor that is not Llama 3's standard rope scaling; "
                                    f"this RoPE variant is not supported")
    return scaling


# ---- tensors ----------------------------------------------------------------------------------------
def check_tensor_types(gf: GGUFFile) -> None:
    """Fail before loading anything if a tensor we need has a type we cannot dequantize."""
    arch = gf.get("general.architecture")
    for info in gf.tensors:
        if hf_name(info.name, arch) is not None and info.type_name not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"tensor {info.name} in {gf.path} has GGML type {info.type_name}, which "
                                        f"is not supported; supported: {', '.join(SUPPORTED_TYPES)}")


def _dequantize(gf: GGUFFile, info: TensorInfo) -> np.ndarray:
    """A tensor as a new float32 array in HF shape."""
    import gguf

    raw = gf.tensor_bytes(info)  # [rows, bytes_per_row]
    try:
        values = gguf.quants.dequantize(raw, info.ggml_type)
    except NotImplementedError:
        raise UnsupportedModelError(f"tensor {info.name} in {gf.path} has GGML type {info.type_name}, which is "
                                    f"not supported; supported: {', '.join(SUPPORTED_TYPES)}") from None
    if values.dtype != np.float32 or not values.flags.writeable:  # F32 comes back as a view of the map
        values = np.array(values, dtype=np.float32)
    return values.reshape(info.shape)


# ---- GGUF 4-bit blocks -> our int4 layout, without a float round trip ---------------------------------
DIRECT_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
"""GGML types whose values our int4 group-32 format (w = q * scale + min, q in 0..15) holds exactly:
    Q4_0  w = d (q - 8)            -> scale = d, min = -8 d
    Q4_1  w = d q + m              -> scale = d, min = m
    Q4_K  w = (d sc_j) q - dmin m_j  per 32-element sub-block j (6-bit sc_j, m_j)
                                   -> scale = d sc_j, min = -(dmin m_j)
fp16 d times a 6-bit integer is exact in fp32, so q * scale + min rounds exactly like gguf's own
dequantization (tested bit for bit). Q4_0 and Q4_1 store nibbles as we do (byte i = q[i] | q[i + 16]
<< 4 per 32 elements); Q4_K stores 64 elements per 32 bytes (low nibbles first) and is re-packed."""


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """Little-endian float16 at byte `start` of every block: [rows, blocks] float32."""
    return raw[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def pack_int4_direct(raw: np.ndarray, type_name: str, shape: tuple[int, int]):
    """A Q4_0 / Q4_1 / Q4_K tensor's raw bytes [rows, bytes_per_row] -> (qweight [N, K/2] uint8,
    scale [N, K/32] float32, min [N, K/32] float32) in quantization/int4.py's layout."""
    n, k = shape
    if type_name == "Q4_0":
        blocks = raw.reshape(n, k // 32, 18)
        d = _f16(blocks, 0)
        return blocks[..., 2:].reshape(n, k // 2), d, d * np.float32(-8.0)
    if type_name == "Q4_1":
        blocks = raw.reshape(n, k // 32, 20)
        return blocks[..., 4:].reshape(n, k // 2), _f16(blocks, 0), _f16(blocks, 2)
    if type_name == "Q4_K":
        blocks = raw.reshape(n, k // 256, 144)
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, m = _q4k_scales_mins(blocks[..., 4:16].astype(np.uint8))     # [N, K/256, 8] each
        scale = (d[..., None] * sc).reshape(n, k // 32)
        mn = -(dmin[..., None] * m).reshape(n, k // 32)
        qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)                 # 4 chunks of 64 elements
        q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(n, k // 32, 2, 16)  # [.., sub-block, half, 16]
        packed = q[:, :, 0] | (q[:, :, 1] << 4)
        return packed.reshape(n, k // 2), scale.astype(np.float32), mn.astype(np.float32)
    raise ValueError(f"GGML type {type_name} has no direct int4 form")


def _q4k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and mins -> 8 scales and 8 mins per block (as float32)."""
    lo = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return lo.astype(np.float32), mins.astype(np.float32)


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved RoPE pairs -> HF rotate-half halves.

    llama.cpp wrote rows (h, j, pair) for HF's (h, pair, j); swapping the two axes back restores them.
    """
    rows = w.shape[0]
    # [num_heads, 2, rows / num_heads / 2, ...] view of the file's [num_heads, rows/num_heads/2, 2, ...]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_tensors(gf: GGUFFile, config: ModelConfig, direct_int4: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor in [out, in] layout) for every tensor the model uses, in file order.

    With `direct_int4`, the decoder's linear weights stored as DIRECT_INT4_TYPES come as PackedInt4
    (their exact int4 group-32 form, never expanded to float) instead of a float tensor."""
    from scaleinfer.quantization.int4 import PackedInt4

    permuted = PERMUTED_QK[config.architecture]
    norm_plus_one = config.architecture in _NORM_PLUS_ONE
    for info in gf.tensors:
        name = hf_name(info.name, config.architecture)
        if name is None:
            logger.debug("skipping GGUF tensor %s", info.name)
            continue
        if direct_int4 and info.type_name in DIRECT_INT4_TYPES and _is_decoder_linear(name):
            try:
                parts = pack_int4_direct(gf.tensor_bytes(info), info.type_name, tuple(info.shape))
            except (ValueError, IndexError) as exc:
                raise WeightLoadError(f"cannot read tensor {info.name} from {gf.path} ({exc}); the GGUF file is "
                                      f"corrupt") from None
            if permuted and ".self_attn.q_proj." in name:
                parts = [unpermute_qk(p, config.num_heads) for p in parts]
            elif permuted and ".self_attn.k_proj." in name:
                parts = [unpermute_qk(p, config.num_kv_heads) for p in parts]
            yield name, PackedInt4(*(torch.from_numpy(np.array(p)) for p in parts))
            continue
        try:
            data = _dequantize(gf, info)
        except (ValueError, IndexError, TypeError) as exc:
            raise WeightLoadError(f"cannot read tensor {info.name} from {gf.path} ({exc}); the GGUF file is "
                                  f"corrupt") from None
        if permuted and ".self_attn.q_proj." in name:
            data = unpermute_qk(data, config.num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            data = unpermute_qk(data, config.num_kv_heads)
        elif norm_plus_one and name.endswith("norm.weight"):
            data = data - np.float32(1.0)
        yield name, torch.from_numpy(np.ascontiguousarray(data))


def count_tensors(gf: GGUFFile) -> int:
    """How many tensors iter_tensors yields (for the progress bar)."""
    arch = gf.get("general.architecture")
    return sum(hf_name(info.name, arch) is not None for info in gf.tensors)


def tokenizer_fields(gf: GGUFFile) -> dict:
    """Every tokenizer.* metadata field and general.architecture (some vocabularies are read per model
    family), as plain Python values: the input of Tokenizer.from_gguf_fields."""
    return check_tokenizer_fields(gf.path, {k: v for k, v in gf.metadata.items()
                                            if k.startswith("tokenizer.") or k == "general.architecture"})
