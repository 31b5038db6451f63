"""AttentionMetadata: where each new token's K/V goes and which cached K/V each query reads.

Built once per step by the model runner and passed explicitly through the model to every layer.
Tokens of a step are laid out flat: first the decode-like requests (query length 1, batched),
then each prefill chunk (query length > 1) contiguously.

    flat tokens:  [d0 d1 d2 | p0 p0 p0 p0 | p1 p1 ...]
                   decodes    prefill 0     prefill 1
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat cache slot (block_id * block_size + offset) of each new token."""
    num_decode_tokens: int = 0
    decode_slots: torch.Tensor | None = None
    """[num_decodes, max_context] int64: cache slots each decode query reads (padded with 0)."""
    decode_mask: torch.Tensor | None = None
    """[num_decodes, 1, 1, max_context] bool: True where the slot is real context; None if all are."""
    prefills: list[PrefillSeq] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        """A copy with every tensor on `device` (metadata is built on the CPU)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return AttentionMetadata(
            slot_mapping=move(self.slot_mapping), num_decode_tokens=self.num_decode_tokens,
            decode_slots=move(self.decode_slots), decode_mask=move(self.decode_mask),
            prefills=[PrefillSeq(p.query_start, p.query_len, p.context_len, move(p.kv_slots), move(p.mask))
                      for p in self.prefills])


def build_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
) -> AttentionMetadata:
    """Metadata for a step. Requests must be ordered decodes (query_len == 1) first.

    context_lens[i] counts the tokens request i attends to after this step's tokens are written.
    """
    slot_mapping: list[int] = []
    for qlen, clen, table in zip(query_lens, context_lens, block_tables):
        for pos in range(clen - qlen, clen):
            slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long))

    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta.num_decode_tokens = num_decodes
    if num_decodes:
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
        if not bool(real.all()):  # all contexts equally long (e.g. batch 1): no mask needed
            meta.decode_mask = real.view(num_decodes, 1, 1, max_ctx)

    start = num_decodes
    for qlen, clen, table in zip(query_lens[num_decodes:], context_lens[num_decodes:], block_tables[num_decodes:]):
        seq = PrefillSeq(query_start=start, query_len=qlen, context_len=clen)
        if clen > qlen:  # earlier chunks are in the cache: read the whole context through the table
            pos = torch.arange(clen, dtype=torch.long)
            blocks = torch.tensor(table, dtype=torch.long)[pos // block_size]
            seq.kv_slots = blocks * block_size + pos % block_size
            q_pos = torch.arange(clen - qlen, clen).unsqueeze(1)
            seq.mask = pos.unsqueeze(0) <= q_pos            # causal with an offset: [qlen, clen]
        meta.prefills.append(seq)
        start += qlen
    return meta
