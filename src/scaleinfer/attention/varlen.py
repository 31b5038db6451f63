"""Bidirectional attention over packed sequences (encoders): no KV cache, no padding outside attention.

The encoder's tokens arrive concatenated ([T, ...], sequence i holding its tokens back to back); every
linear layer runs on exactly T rows. Only attention needs sequences apart: VarlenMetadata sorts them
by length into groups of similar length, and for each group the packed q/k/v rows are gathered into a
[b, heads, L, d] block (L the group's longest), SDPA runs with a key padding mask (plus an optional
additive bias such as MPNet's relative positions), and the real rows are scattered back. Grouping keeps
the padding small however mixed the batch is; a group of equal lengths needs no mask at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_WASTE = 1.25
"""A group grows while its padded size stays under this multiple of its real tokens (plus GROUP_SLACK)."""
GROUP_SLACK = 64
MAX_GROUP = 64


@dataclass
class AttentionGroup:
    batch: int
    max_len: int
    gather: torch.Tensor | None
    """[batch * max_len]: the packed row of each padded slot; a padding slot repeats its sequence's first
    row (a masked key, a query whose output is never read), so no zero row has to be appended to q/k/v;
    None: the rows are already this group's padded block, in order."""
    key_mask: torch.Tensor | None
    """[batch, 1, 1, max_len] bool, True for real keys; None when every key is real."""


@dataclass
class VarlenMetadata:
    seq_lens: list[int] | None
    """Lengths of the packed sequences; None for an already padded batch (padded())."""
    max_len: int
    groups: list[AttentionGroup]
    scatter: torch.Tensor | None = None
    """[T]: where each packed row sits in the groups' padded outputs, concatenated."""

    @property
    def batch(self) -> int:
        return sum(g.batch for g in self.groups)

    def group_masks(self, bias: torch.Tensor) -> list[torch.Tensor]:
        """Each group's attention mask with an additive [heads, L, L] bias folded in (padding keys -inf):
        built once per forward when every layer shares the bias (MPNet), instead of once per layer."""
        return [_mask(g, bias) for g in self.groups]

    @classmethod
    def padded(cls, batch, max_len, attention_mask: torch.Tensor) -> "VarlenMetadata":
        """Rows that are a padded [B, L] batch flattened (ONNX export: B and L may be symbolic)."""
        return cls(None, max_len, [AttentionGroup(batch, max_len, None, attention_mask.bool()[:, None, None, :])])

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "VarlenMetadata":
        max_len = max(seq_lens)
        if all(n == max_len for n in seq_lens):
            return cls(seq_lens, max_len, [AttentionGroup(len(seq_lens), max_len, None, None)])
        order = sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])
        members, cur, tokens = [], [], 0
        for i in order:
            n = seq_lens[i]
            if cur and (len(cur) >= MAX_GROUP or
                        (len(cur) + 1) * seq_lens[cur[0]] > GROUP_WASTE * (tokens + n) + GROUP_SLACK):
                members.append(cur)
                cur, tokens = [], 0
            cur.append(i)
            tokens += n
        members.append(cur)
        return cls(seq_lens, max_len, *_groups(members, seq_lens, device))


def _groups(members: list[list[int]], seq_lens: list[int], device) -> tuple[list[AttentionGroup], torch.Tensor]:
    total = sum(seq_lens)
    starts, acc = [], 0
    for n in seq_lens:
        starts.append(acc)
        acc += n
    groups, scatter, offset = [], torch.empty(total, dtype=torch.long), 0
    for group in members:
        lens = [seq_lens[i] for i in group]
        longest = max(lens)
        gather = torch.empty((len(group), longest), dtype=torch.long)
        for j, i in enumerate(group):
            gather[j, :lens[j]] = torch.arange(starts[i], starts[i] + lens[j])
            gather[j, lens[j]:] = starts[i]
            scatter[starts[i]:starts[i] + lens[j]] = torch.arange(lens[j]) + offset + j * longest
        mask = None
        if any(n != longest for n in lens):
            mask = (torch.arange(longest)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :].to(device)
        groups.append(AttentionGroup(len(group), longest, gather.view(-1).to(device), mask))
        offset += len(group) * longest
    return groups, scatter.to(device)


def _mask(g: AttentionGroup, bias: torch.Tensor | None) -> torch.Tensor | None:
    if bias is None:
        return g.key_mask
    b = bias[..., :g.max_len, :g.max_len]
    return b if g.key_mask is None else torch.where(g.key_mask, b, float("-inf"))


def _attend(block: torch.Tensor, g: AttentionGroup, mask, out: torch.Tensor | None = None) -> torch.Tensor:
    """One group: [b * L, 3, heads, d] padded q/k/v rows -> [b * L, heads * d] (written into `out` if given)."""
    q, k, v = block.view(g.batch, g.max_len, *block.shape[1:]).permute(2, 0, 3, 1, 4).unbind(0)  # [b, heads, L, d]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    if out is None:
        return o.reshape(g.batch * g.max_len, -1)
    out.view(o.shape).copy_(o)
    return out


def varlen_attention(qkv: torch.Tensor, meta: VarlenMetadata,
                     bias: torch.Tensor | list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """qkv: [T, 3, heads, d] packed -> [T, heads * d]. `bias`: additive [heads, L, L], or the masks of
    meta.group_masks(bias). Per group: one gather into its padded block, one SDPA written into its slice of
    the padded output; then one gather back."""
    masks = bias if isinstance(bias, list) else [_mask(g, bias) for g in meta.groups]
    if len(meta.groups) == 1 and meta.groups[0].gather is None:     # every row in place: no gather
        return _attend(qkv, meta.groups[0], masks[0])
    padded = qkv.new_empty(sum(g.batch * g.max_len for g in meta.groups), qkv.shape[2] * qkv.shape[3])
    offset = 0
    for g, m in zip(meta.groups, masks):     # each group's output straight into its slice: no cat
        rows = g.batch * g.max_len
        _attend(qkv.index_select(0, g.gather), g, m, padded[offset:offset + rows])
        offset += rows
    return padded.index_select(0, meta.scatter)


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
