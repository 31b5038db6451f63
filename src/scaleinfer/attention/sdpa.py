"""Reference attention backend on torch's scaled_dot_product_attention (CPU or GPU).

Decodes are batched into one SDPA call over K/V gathered through the block tables; grouped-query
attention is handled without copying K/V by folding each KV head's query group into the query
axis. Prefill chunks (or, for a non-causal pattern, 256-query tiles of them) run one by one: a chunk
with no cached context attends to its own K/V with `is_causal`, otherwise the gathered keys with a
mask. Storage is a hook (`_write` / `_read`): a cache tensor of another dtype than the compute (float16
K/V for a float32 model) is converted on write and read, and a quantized cache (attention/kv_int8.py:
Int8KV, anything with write / read) quantizes on write and dequantizes on read. A fresh prefill attends
to what was stored (rounded to the cache's dtype), so it sees exactly what later decodes will.

StreamingLLM positions within the cache (patterns with positions=cache): a row with a sink shift
sees the first `num_sinks` gathered keys `shift` positions nearer. RoPE makes a score depend only on
the rotation between query and key, so a decode rotates its gathered sink keys forward by the shift
(`rotate`), and a prefill tile scores its sinks with each query rotated back by its own shift.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scaleinfer.attention.metadata import AttentionMetadata, PrefillSeq
from scaleinfer.layers.fused import fused_ops


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE rotation (HF rotate-half layout) of x by `shift` positions; shift broadcasts against
    x's leading dims, x's last dim is head_dim = 2 * len(inv_freq)."""
    angles = shift.to(torch.float64).unsqueeze(-1) * inv_freq.to(torch.float64)      # [..., D/2]
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(x.dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class SdpaBackend:
    # ---- storage hooks ---------------------------------------------------------------------------
    def _write(self, cache, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Store the step's K or V; returns what a fresh prefill should attend to (what was stored)."""
        if not isinstance(cache, torch.Tensor):
            return cache.write(slots, x)
        if cache.dtype == x.dtype:
            cache.index_copy_(0, slots, x)
            return x
        stored = x.to(cache.dtype)
        cache.index_copy_(0, slots, stored)
        return stored.to(x.dtype)

    def _read(self, cache, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(cache, torch.Tensor):
            return cache.read(slots, dtype)
        return cache.index_select(0, slots).to(dtype)

    def _write_kv(self, k_cache, v_cache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self._write(k_cache, slots, k), self._write(v_cache, slots, v)

    # ---- attention -------------------------------------------------------------------------------
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        """`rope`: the layer's RoPE inverse frequencies, needed only for sink shifts."""
        group = q.shape[1] // k.shape[1]
        k_new, v_new = self._write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous even when q is a view
        shifted = meta.decode_sink_shift is not None or any(p.sink_shift is not None for p in meta.prefills)
        if shifted and rope is None:
            raise RuntimeError("positions=cache needs the layer's RoPE frequencies (Attention.rope_inv_freq)")

        if meta.num_decode_tokens:
            self._decode(q, k_cache, v_cache, meta, scale, rope, out)

        for seq in meta.prefills:
            s, n = seq.query_start, seq.query_len
            if seq.kv_slots is None:
                ks, vs = k_new[s:s + n], v_new[s:s + n]
                mask, causal = None, True
            else:
                ks, vs = self._read(k_cache, seq.kv_slots, q.dtype), self._read(v_cache, seq.kv_slots, q.dtype)
                mask, causal = seq.mask, False
            if seq.sink_shift is not None:
                out[s:s + n] = _shifted_sinks_attention(q[s:s + n], ks, vs, seq, meta.num_sinks, scale, rope)
                continue
            qs = q[s:s + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
            ks = ks.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, head_dim]
            vs = vs.transpose(0, 1).unsqueeze(0)
            os_ = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=group > 1
            )
            out[s:s + n] = os_.squeeze(0).transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, rope, out) -> None:
        """Rows 0..d-1 of `out`: each decode query against its keys, gathered through meta.decode_slots."""
        d, num_heads, head_dim = meta.num_decode_tokens, q.shape[1], q.shape[2]
        slots = meta.decode_slots
        max_ctx = slots.shape[1]
        # [d, max_ctx, kv_heads, head_dim] -> [d, kv_heads, max_ctx, head_dim]
        kd = self._read(k_cache, slots.view(-1), q.dtype).view(d, max_ctx, -1, head_dim).transpose(1, 2)
        vd = self._read(v_cache, slots.view(-1), q.dtype).view(d, max_ctx, -1, head_dim).transpose(1, 2)
        num_kv_heads = kd.shape[1]
        if meta.decode_sink_shift is not None:
            s = meta.num_sinks
            kd[:, :, :s] = rotate(kd[:, :, :s], meta.decode_sink_shift.view(d, 1, 1), rope)
        qd = q[:d].reshape(d, num_kv_heads, num_heads // num_kv_heads, head_dim)  # query group folded in
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale)
        out[:d] = od.reshape(d, num_heads, head_dim)


_KERNEL_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_kv_args(k_cache, v_cache) -> tuple | None:
    """A layer's KV cache as the CPU kernels take it (cpu_ops.cpp: kv_write, paged_decode_attention):
    (k, v, k_scale, v_scale, k_chan, v_chan), or None when they do not cover it. A tensor cache of
    float32 / float16 / bfloat16 on the CPU passes as is; an int8 cache (attention/kv_int8.py: Int8KV)
    passes its data, per-token scales and per-channel key scales."""
    if isinstance(k_cache, torch.Tensor):
        if k_cache.dtype not in _KERNEL_KV_DTYPES or k_cache.device.type != "cpu":
            return None
        return k_cache, v_cache, None, None, None, None
    if k_cache.data.device.type != "cpu":
        return None
    return k_cache.data, v_cache.data, k_cache.scale, v_cache.scale, k_cache.channel_scale, v_cache.channel_scale


class CpuPagedBackend(SdpaBackend):
    """The sdpa backend with decode attention and K/V writes in fused CPU kernels (kernels/csrc/
    cpu_ops.cpp): each decode query reads its keys straight through the slot table (no gathered copy),
    and both caches are written in one call; float16, bfloat16 and int8 caches are converted in the
    kernels. Prefills, sink shifts and compute in anything but float32 on the CPU take the sdpa code,
    which is also the reference this backend is tested against."""

    @staticmethod
    def _ops(x: torch.Tensor, k_cache, v_cache):
        """(the kernels, the cache as they take it) if x (heads contiguous) and the cache suit them."""
        kv = kernel_kv_args(k_cache, v_cache)
        if kv is None or x.stride(1) != x.shape[2]:
            return None, None
        return fused_ops(x), kv

    def _write_kv(self, k_cache, v_cache, slots, k, v):
        ops, kv = self._ops(k, k_cache, v_cache) if v.stride(1) == v.shape[2] else (None, None)
        if ops is None:
            return super()._write_kv(k_cache, v_cache, slots, k, v)
        ops.kv_write(kv[0], kv[1], slots, k, v, *kv[2:])
        if kv[2] is None and kv[0].dtype == k.dtype:
            return k, v
        return self._read(k_cache, slots, k.dtype), self._read(v_cache, slots, v.dtype)  # what was stored

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, rope, out) -> None:
        ops, kv = self._ops(q, k_cache, v_cache)
        if ops is None or meta.decode_sink_shift is not None or meta.decode_lens is None:
            return super()._decode(q, k_cache, v_cache, meta, scale, rope, out)
        ops.paged_decode_attention(out, q, kv[0], kv[1], meta.decode_slots, meta.decode_lens, scale, *kv[2:])


def _shifted_sinks_attention(q, k, v, seq: PrefillSeq, num_sinks: int, scale: float, rope) -> torch.Tensor:
    """Explicit attention of one tile whose rows see the sinks (the first num_sinks keys) shifted.
    q [n, H, D]; k, v [ctx, Hkv, D] -> [n, H, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,khd->hnk", q, k) * scale
    q_back = rotate(q, -seq.sink_shift.view(-1, 1), rope)
    scores[:, :, :num_sinks] = torch.einsum("nhd,khd->hnk", q_back, k[:num_sinks]) * scale
    scores = scores.masked_fill(~seq.mask.unsqueeze(0), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("hnk,khd->nhd", probs, v)
