"""Bidirectional attention over packed sequences (encoders): no KV cache, no padding outside attention.

The encoder's tokens arrive concatenated ([T, ...], sequence i holding tokens cu_seqlens[i]:cu_seqlens[i+1]);
every linear layer runs on exactly T rows. Only attention needs sequences apart: the packed q/k/v are
scattered into a [B, heads, L, d] layout (L the longest sequence of the batch), SDPA runs with a key
padding mask (plus an optional additive bias such as MPNet's relative positions), and the real rows are
gathered back. When every sequence has the same length no mask is built at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class VarlenMetadata:
    seq_lens: list[int] | None
    """Lengths of the packed sequences; None for an already padded batch (padded())."""
    max_len: int
    index: torch.Tensor | None
    """Row of each packed token in the [B * max_len] padded layout; None when the rows are already padded."""
    key_mask: torch.Tensor | None
    """[B, 1, 1, max_len] bool, True for real keys; None when every key is real."""
    batch: int = 0

    @classmethod
    def padded(cls, batch, max_len, attention_mask: torch.Tensor) -> "VarlenMetadata":
        """Rows that are a padded [B, L] batch flattened (ONNX export: B and L may be symbolic)."""
        return cls(None, max_len, None, attention_mask.bool()[:, None, None, :], batch)

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "VarlenMetadata":
        max_len = max(seq_lens)
        if all(n == max_len for n in seq_lens):
            return cls(seq_lens, max_len, None, None, len(seq_lens))
        lens = torch.tensor(seq_lens, device=device)
        arange = torch.arange(max_len, device=device)
        valid = arange[None, :] < lens[:, None]                     # [B, L]
        index = (torch.arange(len(seq_lens), device=device)[:, None] * max_len + arange[None, :])[valid]
        return cls(seq_lens, max_len, index, valid[:, None, None, :], len(seq_lens))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] packed -> [B, L, ...] (zeros in the padding)."""
        if self.index is None:
            return x.view(self.batch, self.max_len, *x.shape[1:])
        out = x.new_zeros(self.batch * self.max_len, *x.shape[1:])
        out.index_copy_(0, self.index, x)
        return out.view(self.batch, self.max_len, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...] (the real rows, in packed order)."""
        flat = x.reshape(self.batch * self.max_len, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMetadata,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: [T, heads, d] packed -> [T, heads * d]. `bias`: additive [heads, L, L] (or broadcastable)."""
    qp, kp, vp = (meta.pad(t).transpose(1, 2) for t in (q, k, v))     # [B, heads, L, d]
    mask = meta.key_mask
    if bias is not None:
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    return meta.unpad(out.transpose(1, 2)).flatten(1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The simple reference: one SDPA call per sequence (tests compare varlen_attention with it)."""
    outs, start = [], 0
    for n in seq_lens:
        sl = slice(start, start + n)
        b = None if bias is None else bias[..., :n, :n]
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                           attn_mask=b)
        outs.append(o.transpose(0, 1).flatten(1))
        start += n
    return torch.cat(outs)
