"""BlockManager.fork and copy-on-write: beams share blocks by reference count; the first write into a
shared block copies it; every reference comes back when the beams are freed."""
import pytest

from scaleinfer.errors import RequestError
from scaleinfer.kv_cache.block_manager import BlockManager
from scaleinfer.request import Request
from scaleinfer.sampling_params import BeamSearchParams, SamplingParams


def beam(rid, tokens):
    r = Request(rid, list(tokens), SamplingParams(temperature=0, use_beam_search=True, n=2))
    return r


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(8, 4)
    parent = beam("p", range(6))
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6            # blocks [a, b*]: b holds tokens 4, 5 (partly filled)
    child = parent.fork("c")
    bm.fork(parent, child)
    assert child.block_ids == parent.block_ids and child.num_computed_tokens == 6
    assert [bm.ref_counts[b] for b in parent.block_ids] == [2, 2] and bm.num_free_blocks == 6
    parent.append_output_token(7)
    child.append_output_token(8)
    assert child.all_token_ids[-1] == 8 and parent.all_token_ids[-1] == 7 and child.prompt_token_ids == parent.prompt_token_ids
    shared = parent.block_ids[1]
    assert bm.num_blocks_needed(parent, 7) == 1   # the copy of the shared block it writes into
    bm.allocate(parent, 7)
    assert parent.block_ids[0] == child.block_ids[0] and parent.block_ids[1] != shared
    assert bm.take_copies() == [(shared, parent.block_ids[1])] and bm.take_copies() == []
    assert bm.ref_counts[shared] == 1
    assert bm.num_blocks_needed(child, 7) == 0    # now the only holder: writes in place
    bm.allocate(child, 7)
    assert child.block_ids[1] == shared and bm.take_copies() == []
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)


def test_full_shared_blocks_are_never_copied():
    bm = BlockManager(8, 4)
    parent = beam("p", range(8))
    bm.allocate(parent, 8)
    parent.num_computed_tokens = 8            # two full blocks: the next token opens a new one
    child = parent.fork("c")
    bm.fork(parent, child)
    for r, t in ((parent, 1), (child, 2)):
        r.append_output_token(t)
        bm.allocate(r, 9)
    assert bm.take_copies() == [] and parent.block_ids[:2] == child.block_ids[:2]
    assert parent.block_ids[2] != child.block_ids[2]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_beam_params_validation():
    assert SamplingParams(temperature=0, use_beam_search=True, n=2, best_of=4).beam_width == 4
    bad = [dict(use_beam_search=True, n=2),                                   # temperature 1 (default)
           dict(temperature=0, use_beam_search=True, n=4, best_of=2),         # best_of < n
           dict(temperature=0, n=1, best_of=3),                               # best_of without beams
           dict(temperature=0, length_penalty=0.5),                           # length_penalty without beams
           dict(temperature=0, use_beam_search=True, top_p=0.9),
           dict(temperature=0, use_beam_search=True, early_stopping="sometimes")]
    for kw in bad:
        with pytest.raises(RequestError):
            SamplingParams(**kw)
    p = BeamSearchParams(beam_width=3, max_tokens=5).to_sampling_params()
    assert p.use_beam_search and p.n == 3 and p.beam_width == 3 and p.max_tokens == 5
