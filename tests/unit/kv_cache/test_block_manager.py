"""BlockManager: free queue, reference counts, prefix-cache sharing and lazy eviction."""
from scaleinfer.kv_cache.block_manager import BlockManager
from scaleinfer.request import Request
from scaleinfer.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def test_allocate_and_free_round_trip():
    bm = BlockManager(8, 4)
    r = req("a", range(9))
    assert bm.num_blocks_needed(r, 9) == 3
    bm.allocate(r, 9)
    assert len(r.block_ids) == 3 and len(set(r.block_ids)) == 3 and bm.num_free_blocks == 5
    bm.allocate(r, 12)  # still fits in 3 blocks
    assert len(r.block_ids) == 3
    bm.free(r)
    assert bm.num_free_blocks == 8 and r.block_ids == []
    assert not bm.can_allocate(req("b", range(40)), 40)


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = req("a", range(9))
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    b = req("b", list(range(8)) + [99, 98])
    assert bm.match_prefix(b) == 8
    assert b.block_ids == a.block_ids[:2]
    assert bm.ref_counts[a.block_ids[0]] == 2
    bm.free(a)
    assert bm.ref_counts[b.block_ids[0]] == 1 and bm.num_free_blocks == 6
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_freed_cached_blocks_are_revived_until_reused():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = req("a", range(9))
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    first_blocks = a.block_ids[:2]
    bm.free(a)
    b = req("b", range(9))
    assert bm.match_prefix(b) == 8 and b.block_ids == first_blocks
    bm.free(b)
    # Fill the whole cache with other tokens: the cached blocks get evicted.
    c = req("c", range(500, 516))
    bm.allocate(c, 16)
    bm.free(c)
    assert bm.match_prefix(req("d", range(9))) == 0


def test_blocks_without_a_cached_prefix_are_reused_first():
    """A freed block that holds no cached prefix is the next one handed out (its pages are warm); one that
    holds a cached prefix waits at the back, so the cache keeps it as long as there is other room."""
    bm = BlockManager(64, 4)   # prefix caching off: nothing is worth keeping
    a = req("a", range(9))
    bm.allocate(a, 9)
    used = set(a.block_ids)
    bm.free(a)
    for i in range(5):         # one request after another: the same three blocks every time
        r = req(f"r{i}", range(10))
        bm.allocate(r, 10)
        assert set(r.block_ids) == used
        bm.free(r)

    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = req("a", range(10))    # two full blocks (cached) and a partial one
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    cached, partial = a.block_ids[:2], a.block_ids[2]
    bm.free(a)
    b = req("b", [50] * 3)
    bm.allocate(b, 3)
    assert b.block_ids == [partial]            # the uncached block first
    c = req("c", [60] * 20)
    bm.allocate(c, 20)                         # five more: the never-used blocks before the cached ones
    assert not set(c.block_ids) & set(cached)
    d = req("d", list(range(8)) + [7])
    assert bm.match_prefix(d) == 8 and d.block_ids == cached
