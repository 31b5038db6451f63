"""StepInputs (runner/forward_batch.py): a step as plain ints, what the driver broadcasts to the other ranks
of a distributed engine. Encoding and decoding give back every field, positions included; a batch built
from the decoded inputs has the tensors of the driver's batch."""
from __future__ import annotations

import torch

from scaleinfer.request import Request
from scaleinfer.runner.forward_batch import StepInputs, batch_from_inputs, build_forward_batch
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.scheduler import SchedulerOutput


def _sched() -> SchedulerOutput:
    prefill = Request("p", list(range(40)), SamplingParams(max_tokens=4))
    prefill.block_ids = [3, 7, 9]
    decode = Request("d", list(range(10)), SamplingParams(max_tokens=4))
    decode.block_ids = [1]
    decode.num_computed_tokens = 10
    decode.append_output_token(42)
    chunk = Request("c", list(range(30)), SamplingParams(max_tokens=4))
    chunk.block_ids = [2, 4]
    return SchedulerOutput([prefill, decode, chunk], [40, 1, 16], [0, 10, 0])


def test_encode_decode_round_trip():
    batch = build_forward_batch(_sched(), 16)
    op, inputs = StepInputs.decode(batch.inputs.encode(7))
    assert op == 7 and inputs == batch.inputs
    assert inputs.query_lens == [1, 40, 16] and inputs.tables == [[1], [3, 7, 9], [2, 4]]
    assert inputs.logits_indices == [0, 40]   # the chunk stops short of its prompt's end: no sample


def test_a_batch_from_decoded_inputs_equals_the_drivers():
    batch = build_forward_batch(_sched(), 16)
    _, inputs = StepInputs.decode(batch.inputs.encode(1))
    other = batch_from_inputs(inputs, 16)
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(other, name), getattr(batch, name))
    assert torch.equal(other.meta.slot_mapping, batch.meta.slot_mapping)
    assert torch.equal(other.meta.decode_slots, batch.meta.decode_slots)


def test_an_empty_stop_message_decodes():
    op, inputs = StepInputs.decode(torch.tensor([0, 0, 0, 0], dtype=torch.long))
    assert op == 0 and inputs == StepInputs()
