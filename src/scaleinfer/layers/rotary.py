"""Rotary position embeddings (Su et al. 2021, RoFormer), HF "rotate half" layout.

The cos/sin tables are computed once for max_position_embeddings; each step gathers the rows for
its positions once (`lookup`) and every layer reuses them.

Scaling variants (the HF `rope_scaling` / `rope_parameters` dict, key `rope_type` or legacy `type`),
each matching `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[type]`:
default, linear, dynamic (NTK-aware, see `dynamic_ntk_inv_freq` and `RotaryEmbedding`), yarn, llama3.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from scaleinfer.errors import UnsupportedModelError
from scaleinfer.layers.fused import fused_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _kind(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type")) or "default"


def _get(scaling: dict, key: str, kind: str, default=None, *, allow_none: bool = False):
    """scaling[key]; a missing key (or a null one, unless allow_none) is an UnsupportedModelError when no
    default is given."""
    if key in scaling and (scaling[key] is not None or allow_none):
        return scaling[key]
    if default is not None:
        return default
    raise UnsupportedModelError(f"rope scaling type {kind!r} needs {key!r} in the config's rope_scaling "
                                f"(or rope_parameters), which lacks it")


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, original_max: int,
                         seq_len: int) -> torch.Tensor:
    """Dynamic NTK inverse frequencies for a forward pass over `seq_len` positions, exactly as HF's
    `_compute_dynamic_ntk_parameters(config, seq_len=seq_len)` (with config.max_position_embeddings =
    original_max): below original_max the base is unchanged; above, it is raised to
    theta * (factor * seq_len / original_max - (factor - 1)) ** (dim / (dim - 2)). [head_dim / 2], float64."""
    seq_len = max(int(seq_len), int(original_max))
    base = theta * ((factor * seq_len / original_max) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(head_dim, base)


def _yarn(head_dim: int, theta: float, scaling: dict, max_position: int | None) -> tuple[torch.Tensor, float]:
    """HF's `_compute_yarn_parameters`, step for step (in float64)."""
    kind = "yarn"
    original = _get(scaling, "original_max_position_embeddings", kind, max_position)
    factor = _get(scaling, "factor", kind, allow_none=True)
    if factor is None:  # DeepSeek-V3 style: the ratio of the extended to the pretrained context
        if max_position is None:
            raise UnsupportedModelError("rope scaling type 'yarn' has factor null and no max_position_embeddings "
                                        "to derive it from")
        factor = max_position / original
    factor, original = float(factor), float(original)
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    truncate = scaling.get("truncate", True)
    dim = head_dim

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate by factor
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _inv_freq(head_dim: int, theta: float, scaling: dict | None,
              max_position: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (float64) and the attention factor that cos/sin are multiplied by
    (1.0 except for YaRN). `max_position` is the config's max_position_embeddings: HF's default for
    original_max_position_embeddings (llama3, yarn) and dynamic NTK's threshold. For "dynamic" this is the
    unscaled base, what every position below max_position uses (RotaryEmbedding applies the rest)."""
    inv_freq = _base_inv_freq(head_dim, theta)
    kind = _kind(scaling)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(_get(scaling, "factor", kind)), 1.0
    if kind == "dynamic":
        _get(scaling, "factor", kind)
        return inv_freq, 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, max_position)
    if kind == "llama3":
        # Llama 3.1: long wavelengths scaled by `factor`, short kept, smooth blend in between.
        factor = float(_get(scaling, "factor", kind))
        low = float(_get(scaling, "low_freq_factor", kind))
        high = float(_get(scaling, "high_freq_factor", kind))
        old_len = float(_get(scaling, "original_max_position_embeddings", kind, max_position))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported; supported: "
                                f"{', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by absolute position.

    Dynamic NTK ("dynamic"): HF recomputes the base from the length of the current forward call
    (seq_len = max position id + 1, if above max_position_embeddings) and rotates *every* position of
    that call with it. Our table is per position instead: row p uses
    `dynamic_ntk_inv_freq(..., seq_len=max(p + 1, max_position))`, i.e. the frequencies HF would apply if p
    were the last token of a full forward pass. Consequences:
      * identical to HF for any forward pass no longer than max_position_embeddings (plain RoPE);
      * identical to HF's incremental decoding for every decoded token (HF rotates the one new token, query
        and key, with the base for seq_len = p + 1, as we do); keys already in the cache keep the rotation
        they were written with, in both;
      * different from HF for a prompt of length L > max_position_embeddings processed in one call: HF
        rotates all L prompt tokens with the base for L, we rotate token p with the base for p + 1 (only the
        last prompt token agrees).
    Why: a token's rotation must depend on its position only, so that a cached key is valid whatever the
    request's length when it was written (prefix caching, chunked prefill, batching). Note that this also
    means q.k is not purely a function of relative position beyond max_position_embeddings (true of HF's
    decoding as well), and that `inv_freq` (used to re-rotate attention sinks) is the unscaled base, exact
    only below max_position_embeddings.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq, attn_factor = _inv_freq(head_dim, theta, scaling, max_position)
        self.attn_factor = attn_factor
        self._dynamic = None
        """(theta, factor, original_max) for dynamic NTK, else None."""
        if _kind(scaling) == "dynamic":
            self._dynamic = (float(theta), float(scaling["factor"]), int(max_position))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        """[head_dim / 2]: also what attention patterns with positions=cache re-rotate sinks with."""
        self._inv_freq64 = inv_freq
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_position)

    def _build(self, num_positions: int) -> None:
        t = torch.arange(num_positions, dtype=torch.float64)
        if self._dynamic is None:
            freqs = torch.outer(t, self._inv_freq64)               # [num_positions, head_dim / 2]
        else:
            # Per-position base (class docstring): seq_len = max(p + 1, original); vectorised
            # dynamic_ntk_inv_freq.
            theta, factor, original = self._dynamic
            dim = 2 * self._inv_freq64.shape[0]
            seq_len = torch.clamp(t + 1, min=original)
            base = theta * (factor * seq_len / original - (factor - 1)) ** (dim / (dim - 2))
            exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
            freqs = t[:, None] / base[:, None] ** exponent[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)               # [num_positions, head_dim]
        device = self.cos.device
        self.cos = (emb.cos() * self.attn_factor).float().to(device)
        self.sin = (emb.sin() * self.attn_factor).float().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the given positions: [num_tokens, 1, head_dim] each. Positions past the table
        (a stream under a distance-bounded attention pattern) grow it, doubling."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], int(positions.max()) + 1))
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim] -> rotated, same shape."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary in place (x may be a view, e.g. the Q|K columns of a fused QKV output); returns x."""
    ops = fused_ops(x)
    if ops is not None and x.stride(-1) == 1 and cos.dtype == torch.float32 and cos.is_contiguous() \
            and sin.is_contiguous():
        ops.rotary_(x, cos, sin)
        return x
    return x.copy_(apply_rotary(x, cos, sin))
