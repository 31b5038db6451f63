"""AttentionMetadata: where each new token's K/V goes and which cached K/V each query reads.

Built once per step by the model runner and passed explicitly through the model to every layer.
Tokens of a step are laid out flat: first the decode-like requests (query length 1, batched),
then each prefill chunk (query length > 1) contiguously.

    flat tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ...]
                   decodes    prefill 0     prefill 1
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from scaleinfer.attention.patterns import CAUSAL, AttentionPattern


@dataclass
class PrefillSeq:
    query_start: int
    query_len: int
    context_len: int
    """Tokens this chunk attends to: the already-cached ones plus its own."""
    kv_slots: torch.Tensor | None = None
    """[context_len] cache slots of the context, or None when the chunk is the whole context."""
    mask: torch.Tensor | None = None
    """[query_len, context_len] bool (True = attend) when kv_slots is set; None = plain causal."""
    sink_shift: torch.Tensor | None = None
    """[query_len] int64 (positions=cache patterns): each row sees the first `num_sinks` keys this
    many positions nearer (the backend rotates that row's query back for them); None = no shift."""


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat cache slot (block_id * block_size + offset) of each new token."""
    num_decode_tokens: int = 0
    decode_slots: torch.Tensor | None = None
    """[num_decodes, max_keys] int64: cache slots each decode query reads (padded with its first slot)."""
    decode_mask: torch.Tensor | None = None
    """[num_decodes, 1, 1, max_keys] bool: True where the slot is a key to attend; None if all are."""
    decode_lens: torch.Tensor | None = None
    """[num_decodes] int64: how many leading entries of each decode_slots row are keys (the mask as lengths)."""
    prefills: list[PrefillSeq] = field(default_factory=list)
    decode_sink_shift: torch.Tensor | None = None
    """[num_decodes] int64 (positions=cache patterns): see PrefillSeq.sink_shift."""
    num_sinks: int = 0
    """Leading gathered keys of every row that are sinks (when a sink shift is set)."""
    by_pattern: dict[AttentionPattern, "AttentionMetadata"] = field(default_factory=dict)
    """Views for the non-causal patterns of the model's layers: the same slot_mapping, decode and
    prefill reads restricted to the keys the pattern allows (see `for_pattern`)."""

    def for_pattern(self, pattern: AttentionPattern) -> "AttentionMetadata":
        """The view a layer with `pattern` reads through (self for plain causal attention)."""
        return self if pattern.is_causal else self.by_pattern[pattern]

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        """A copy with every tensor on `device` (metadata is built on the CPU)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return AttentionMetadata(
            slot_mapping=move(self.slot_mapping), num_decode_tokens=self.num_decode_tokens,
            decode_slots=move(self.decode_slots), decode_mask=move(self.decode_mask),
            decode_lens=move(self.decode_lens),
            prefills=[PrefillSeq(p.query_start, p.query_len, p.context_len, move(p.kv_slots), move(p.mask),
                                 move(p.sink_shift)) for p in self.prefills],
            decode_sink_shift=move(self.decode_sink_shift), num_sinks=self.num_sinks,
            by_pattern={k: v.to(device) for k, v in self.by_pattern.items()})


PREFILL_TILE = 256
"""Query rows per attention call for a non-causal pattern's prefill: each tile gathers only the keys
its rows may attend (pattern.key_ranges), so prefill costs O(n * (W + tile)) for a window W."""


def _slots(positions: torch.Tensor, table: list[int], block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


def _positions(ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(s, e, dtype=torch.long) for s, e in ranges])


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    patterns: Iterable[AttentionPattern] = (),
) -> AttentionMetadata:
    """Metadata for a step. Requests must be ordered decodes (query_len == 1) first.

    context_lens[i] counts the tokens request i attends to after this step's tokens are written.
    `patterns`: the attention patterns of the model's layers (default: plain causal). Each non-causal
    one gets a view in `by_pattern`; the causal reads are built only if some layer is causal. A block
    table may hold NULL_BLOCK (-1) for blocks the KV policy freed: pattern views never read them.
    """
    patterns = list(patterns) or [CAUSAL]
    need_causal = any(p.is_causal for p in patterns)
    slot_mapping: list[int] = []
    for qlen, clen, table in zip(query_lens, context_lens, block_tables):
        for pos in range(clen - qlen, clen):
            slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long))

    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta.num_decode_tokens = num_decodes
    if num_decodes and need_causal:
        max_blocks = max(len(t) for t in block_tables[:num_decodes])
        padded = [t + [t[0]] * (max_blocks - len(t)) for t in block_tables[:num_decodes]]
        table = torch.tensor(padded, dtype=torch.long)  # [num_decodes, max_blocks]
        max_ctx = max(context_lens[:num_decodes])
        offsets = torch.arange(block_size, dtype=torch.long)
        slots = (table.unsqueeze(-1) * block_size + offsets).view(num_decodes, -1)[:, :max_ctx]
        ctx = torch.tensor(context_lens[:num_decodes], dtype=torch.long)
        real = torch.arange(max_ctx) < ctx.unsqueeze(1)
        # Padding reads the request's own first slot: never uninitialised memory (NaN * 0 = NaN).
        meta.decode_slots = torch.where(real, slots, slots[:, :1]).contiguous()
        meta.decode_lens = ctx
        if not bool(real.all()):  # all contexts equally long (e.g. batch 1): no mask needed
            meta.decode_mask = real.view(num_decodes, 1, 1, max_ctx)

    start = num_decodes
    for qlen, clen, table in zip(query_lens[num_decodes:], context_lens[num_decodes:], block_tables[num_decodes:]):
        seq = PrefillSeq(query_start=start, query_len=qlen, context_len=clen)
        if clen > qlen and need_causal:  # earlier chunks are in the cache: read the whole context through the table
            pos = torch.arange(clen, dtype=torch.long)
            seq.kv_slots = _slots(pos, table, block_size)
            q_pos = torch.arange(clen - qlen, clen).unsqueeze(1)
            seq.mask = pos.unsqueeze(0) <= q_pos            # causal with an offset: [qlen, clen]
        meta.prefills.append(seq)
        start += qlen

    for pattern in dict.fromkeys(p for p in patterns if not p.is_causal):
        meta.by_pattern[pattern] = _pattern_view(meta, pattern, query_lens, context_lens, block_tables, block_size)
    return meta


def _pattern_view(base: AttentionMetadata, pattern: AttentionPattern, query_lens: list[int],
                  context_lens: list[int], block_tables: list[list[int]], block_size: int) -> AttentionMetadata:
    """Decode and prefill reads restricted to the keys `pattern` allows."""
    view = AttentionMetadata(slot_mapping=base.slot_mapping, num_decode_tokens=base.num_decode_tokens,
                             num_sinks=pattern.sinks if pattern.cache_positions else 0)
    d = base.num_decode_tokens
    if d:
        key_slots = []
        for clen, table in zip(context_lens[:d], block_tables[:d]):
            q = clen - 1
            key_slots.append(_slots(_positions(pattern.key_ranges(q, q + 1)), table, block_size))
        width = max(len(s) for s in key_slots)
        view.decode_slots = torch.stack([torch.cat([s, s[:1].expand(width - len(s))]) for s in key_slots])
        lens = torch.tensor([len(s) for s in key_slots], dtype=torch.long)
        view.decode_lens = lens
        if bool((lens < width).any()):
            view.decode_mask = (torch.arange(width) < lens.unsqueeze(1)).view(d, 1, 1, width)
        if view.num_sinks:
            shift = pattern.sink_shift(torch.tensor(context_lens[:d], dtype=torch.long) - 1)
            view.decode_sink_shift = shift if bool(shift.any()) else None

    start = d
    for qlen, clen, table in zip(query_lens[d:], context_lens[d:], block_tables[d:]):
        for t0 in range(clen - qlen, clen, PREFILL_TILE):
            t1 = min(t0 + PREFILL_TILE, clen)
            k_pos = _positions(pattern.key_ranges(t0, t1))
            q_pos = torch.arange(t0, t1).unsqueeze(1)
            shift = pattern.sink_shift(q_pos.squeeze(1)) if view.num_sinks else None
            view.prefills.append(PrefillSeq(
                query_start=start + t0 - (clen - qlen), query_len=t1 - t0, context_len=len(k_pos),
                kv_slots=_slots(k_pos, table, block_size), mask=pattern.allows(q_pos, k_pos.unsqueeze(0)),
                sink_shift=shift if shift is not None and bool(shift.any()) else None))
        start += qlen
    return view
