"""The encoder side of an encoder-decoder step (models/encoder_decoder.py): run the encoder of the
step's newly admitted requests once, batched, and store their cross-attention K/V in the paged cache;
and the cross-attention metadata of the step's decoder tokens."""
from __future__ import annotations

import torch

from scaleinfer.attention.cross import build_cross_metadata, cross_slots, store_cross_kv
from scaleinfer.attention.metadata import AttentionMetadata
from scaleinfer.request import Request
from scaleinfer.scheduler import SchedulerOutput


def run_encoders(model, kv_caches: list, requests: list[Request], block_size: int,
                 device: torch.device) -> None:
    """Encode `requests` in one model.encode call and write every decoder layer's cross K/V at their
    cross slots."""
    inputs = [r.encoder_input.to(device) for r in requests]
    states = model.encode(inputs)
    expected = sum(r.num_encoder_tokens for r in requests)
    assert states.shape[0] == expected, f"encode() gave {states.shape[0]} states, the requests hold {expected}"
    slots = torch.cat([cross_slots(r.cross_block_ids, r.num_encoder_tokens, block_size) for r in requests])
    store_cross_kv(kv_caches, model.cross_kv(states), slots.to(device))


def cross_step_metadata(sched: SchedulerOutput, block_size: int) -> AttentionMetadata | None:
    """The step's cross-attention metadata, its requests in the flat batch's order (decodes first, as
    forward_batch.step_inputs orders them); None when no request has encoder states."""
    if not any(r.num_encoder_tokens for r in sched.requests):
        return None
    order = sorted(range(len(sched.requests)), key=lambda i: sched.num_scheduled_tokens[i] != 1)
    reqs = [sched.requests[i] for i in order]
    return build_cross_metadata([sched.num_scheduled_tokens[i] for i in order], [r.num_encoder_tokens for r in reqs],
                                [r.cross_block_ids for r in reqs], block_size)
