"""Reference attention backend on torch's scaled_dot_product_attention (CPU or GPU).

Decodes are batched into one SDPA call over K/V gathered through the block tables; grouped-query
attention is handled without copying K/V by folding each KV head's query group into the query
axis. Prefill chunks (or, for a non-causal pattern, 256-query tiles of them) run one by one: a chunk
with no cached context attends to its own K/V with `is_causal`, otherwise the gathered keys with a
mask. Storage is a hook (`_write` / `_read`) so that the int8 KV cache reuses all of this.

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
        """Store the step's K or V; returns what a fresh prefill should attend to (x itself here)."""
        cache.index_copy_(0, slots, x)
        return x

    def _read(self, cache, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return cache.index_select(0, slots)

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


class CpuPagedBackend(SdpaBackend):
    """The sdpa backend with decode attention and K/V writes in fused CPU kernels (kernels/csrc/
    cpu_ops.cpp): each decode query reads its keys straight through the slot table (no gathered copy),
    and both caches are written in one call. Prefills, sink shifts and anything but float32 on the
    CPU take the sdpa code, which is also the reference this backend is tested against."""

    @staticmethod
    def _ops(x: torch.Tensor, cache):
        """The kernels, if x (heads contiguous) and the cache (a float32 tensor) suit them."""
        if not isinstance(cache, torch.Tensor) or cache.dtype != torch.float32 or x.stride(1) != x.shape[2]:
            return None
        return fused_ops(x)

    def _write_kv(self, k_cache, v_cache, slots, k, v):
        ops = self._ops(k, k_cache) if v.stride(1) == v.shape[2] else None
        if ops is None:
            return super()._write_kv(k_cache, v_cache, slots, k, v)
        ops.kv_write(k_cache, v_cache, slots, k, v)
        return k, v

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, rope, out) -> None:
        ops = self._ops(q, k_cache)
        if ops is None or meta.decode_sink_shift is not None or meta.decode_lens is None:
            return super()._decode(q, k_cache, v_cache, meta, scale, rope, out)
        ops.paged_decode_attention(out, q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, scale)


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
