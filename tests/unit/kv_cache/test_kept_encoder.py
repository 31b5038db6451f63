"""Encoder outputs kept across requests (kv_cache/kept_encoder.py, Whisper's temperature fallback): a request
made with keep_encoder_output leaves its cross blocks; a later request with the same encoder input object
takes them without an encoder run; a different input, a release, block pressure or the capacity gives
them back; an abort keeps nothing; every block comes back."""
from __future__ import annotations

from scaleinfer.request import FinishReason, Request
from scaleinfer.sampling_params import SamplingParams
from tests.unit.test_scheduler_encoder import make_scheduler, run_all


def request(rid, encoder_input, keep=True, encoder_tokens=10, max_tokens=4):
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   encoder_input=encoder_input, num_encoder_tokens=encoder_tokens, keep_encoder_output=keep)


def test_a_retry_takes_the_kept_cross_blocks_without_an_encoder_run():
    s = make_scheduler(num_blocks=64)
    window = object()
    first = request("t0", window)
    s.add_request(first)
    assert run_all(s) == ["t0"]
    kept = s.kept_encoder.num_blocks
    assert kept == 3 and s.block_manager.num_free_blocks == 64 - 3   # ceil(10 / 4) cross blocks stay
    retry = request("t1", window)
    s.add_request(retry)
    assert run_all(s) == []                                           # no encoder run
    assert s.kept_encoder.num_blocks == 3                             # kept again for a further retry
    s.release_encoder_output(window)
    assert len(s.kept_encoder) == 0 and s.block_manager.num_free_blocks == 64


def test_another_input_or_no_keep_flag_runs_the_encoder():
    s = make_scheduler(num_blocks=64)
    window = object()
    s.add_request(request("a", window))
    run_all(s)
    s.add_request(request("b", object()))           # an equal-looking but different input object
    s.add_request(request("c", window, keep=False))  # takes what is kept, keeps nothing after
    assert run_all(s) == ["b"]
    assert len(s.kept_encoder) == 1                 # b's blocks kept, window's taken by c and freed
    s.release_encoder_output(window)                # nothing kept for it any more: no-op
    assert len(s.kept_encoder) == 1
    s.kept_encoder.release_oldest()
    assert s.block_manager.num_free_blocks == 64


def test_aborted_requests_keep_nothing():
    s = make_scheduler(num_blocks=64)
    req = request("a", object(), max_tokens=50)
    s.add_request(req)
    s.schedule()
    s.finish_request("a", FinishReason.ABORT)
    assert len(s.kept_encoder) == 0 and s.block_manager.num_free_blocks == 64


def test_block_pressure_gives_kept_blocks_back_before_preempting():
    s = make_scheduler(num_blocks=12)                 # block size 4
    for i in range(3):
        s.add_request(request(f"k{i}", object(), encoder_tokens=12))   # 3 cross blocks each, kept
        run_all(s)
    assert s.kept_encoder.num_blocks == 9
    big = request("big", object(), keep=False, encoder_tokens=16, max_tokens=20)   # 4 cross + 6 self blocks
    s.add_request(big)
    assert run_all(s) == ["big"]
    assert s.num_preemptions == 0 and big.finish_reason == FinishReason.LENGTH
    assert len(s.kept_encoder) == 0 and s.block_manager.num_free_blocks == 12


def test_capacity_bounds_the_kept_entries():
    s = make_scheduler(num_blocks=128)                # max_num_seqs 8: at most 8 entries
    inputs = [object() for _ in range(10)]
    for i, x in enumerate(inputs):
        s.add_request(request(f"r{i}", x))
        run_all(s)
    assert len(s.kept_encoder) == 8
    retry = request("again", inputs[0])               # the oldest went first
    s.add_request(retry)
    assert run_all(s) == ["again"]
    for x in inputs:
        s.release_encoder_output(x)
    assert s.block_manager.num_free_blocks == 128
