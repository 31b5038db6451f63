"""GGUF checkpoints: metadata -> ModelConfig, tensors -> HF-named float32 tensors, tokenizer fields.

Fed by weights/gguf_file.py (the parsed, memory-mapped container); feeds weights/loader.py.
Tensors are dequantized one at a time with the `gguf` package's own `gguf.quants.dequantize`, so
peak memory stays near the size of the model in float32 plus one tensor.

What differs per family (the metadata reader, the tensor-name map, whether llama.cpp's converter
permuted the Q/K rows, whether it stored norm weights as w + 1) is the family's entry in
models/registry.py. llama.cpp permutes the rows of Q and K for the "llama" architecture (it stores
each head's RoPE pairs interleaved, GPT-J style); `unpermute_qk` restores HF's rotate-half layout so
the same model code serves GGUF and safetensors. Gemma 3's converter stored every norm weight as
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
from scaleinfer.models.gguf_config import GLOBAL_NAMES, GGUFMetadata
from scaleinfer.models import registry
from scaleinfer.models.registry import Family, gguf_family
from scaleinfer.tokenizer import Tokenizer
from scaleinfer.weights.gguf_checks import MAX_CONTEXT, check_shapes, check_tokenizer_fields, meta_float, meta_int, meta_str
from scaleinfer.weights.gguf_file import GGUFFile, TensorInfo

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
"""GGML tensor types we dequantize (all through gguf.quants)."""

def hf_name(gguf_name: str, family: Family) -> str | None:
    """The HF parameter name of a GGUF tensor of `family`, or None for tensors we do not load (e.g. rope_freqs)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, index, rest = gguf_name.split(".", 2)
        if rest in family.gguf_layer_names:
            return f"model.layers.{index}.{family.gguf_layer_names[rest]}"
    return None


def file_family(gf: GGUFFile) -> Family:
    """The model family of a GGUF file (its general.architecture)."""
    return gguf_family(gf.get("general.architecture"), gf.path)


# ---- metadata -> ModelConfig ----------------------------------------------------------------------
def read_model_config(gf: GGUFFile) -> ModelConfig:
    """The ModelConfig of a GGUF, by its family's reader (models/gguf_config.py)."""
    family = file_family(gf)
    tensors = {t.name: t for t in gf.tensors}

    def rope_scaling(head_dim: int, theta: float) -> dict | None:
        return _rope_scaling(gf, family.gguf_architecture, tensors, head_dim, theta)

    meta = GGUFMetadata(gf.path, family.gguf_architecture, gf.metadata,
                        {name: tuple(t.shape) for name, t in tensors.items()}, rope_scaling)
    config = family.read_gguf_config(meta)
    check_shapes(gf.path, tensors, config)
    return config


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
    family = file_family(gf)
    for info in gf.tensors:
        if hf_name(info.name, family) is not None and info.type_name not in SUPPORTED_TYPES:
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

    family = registry.family(config.architecture)
    permuted, norm_plus_one = family.gguf_permuted_qk, family.gguf_norm_plus_one
    for info in gf.tensors:
        name = hf_name(info.name, family)
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
    family = file_family(gf)
    return sum(hf_name(info.name, family) is not None for info in gf.tensors)


def stored_types(gf: GGUFFile) -> dict[str, str]:
    """HF name -> GGML type name (e.g. "Q4_K") of every tensor iter_tensors yields: how the file stores it."""
    family = file_family(gf)
    return {name: info.type_name for info in gf.tensors if (name := hf_name(info.name, family)) is not None}


def tokenizer_fields(gf: GGUFFile) -> dict:
    """Every tokenizer.* metadata field, type-checked, as plain Python values: the input of
    Tokenizer.from_gguf_fields."""
    return check_tokenizer_fields(gf.path, {k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")})


def read_tokenizer(gf: GGUFFile) -> Tokenizer:
    """The file's tokenizer, its SentencePiece vocabulary read the way its family spells it."""
    return Tokenizer.from_gguf_fields(tokenizer_fields(gf), file_family(gf).tokenizer_kind)
