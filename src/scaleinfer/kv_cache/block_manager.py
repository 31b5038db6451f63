"""BlockManager: which physical KV blocks each request owns. Pure Python; fed by the Scheduler.

A block holds the K/V of `block_size` consecutive tokens of one sequence. Blocks are handed out from
a free queue and carry reference counts so that identical prompt prefixes can share them (prefix
caching, see prefix_cache.py). Data-structure choices:

- The free queue is an OrderedDict: allocation pops from its front. A freed block that holds a cached
  prefix goes to the back (an LRU: the oldest cached prefix is evicted first) and can be revived from
  the middle in O(1). A freed block that holds nothing reusable (no prefix hash: a partial last block,
  cross-attention K/V, or any block with prefix caching off) goes to the front, so it is the next one
  handed out: the blocks in use stay few and warm. The cache tensors are reserved lazily (torch.empty),
  and the first write into a page costs a page fault plus zeroing (a whole 2 MiB page where the kernel
  backs them with transparent huge pages); cycling through every free block instead made each new
  request touch cold pages (whisper-base's cross K/V writes: ~10 ms a layer on long audio).
- A freed block keeps its prefix hash until it is reallocated ("lazy eviction", as in vLLM v1), so
  a prompt that arrives after its twin finished still hits the cache.

    request.block_ids = [7, 2, 9]          block table: logical block i -> physical block id
    token t lives in block block_ids[t // block_size], slot t % block_size

KV policy for windowed / sparse attention (`free_dead_blocks`): once no future query can attend any
token of a block (see AttentionPattern.live_ranges), the request drops it at once and its table
entry becomes NULL_BLOCK. A sinks + window stream then holds O((sinks + window) / block_size) blocks
however long it runs:

    request.block_ids = [4, -1, -1, -1, 8, 3]     sink block, evicted middle, live window

Sampling siblings (`share_cross`): the children of one n > 1 encoder-decoder request hold the first
admitted child's cross blocks by reference count (one encoder run for all of them).

Beam search (`fork`): a new beam shares every block of its parent by reference count. The first
write into a shared block (the parent's partly filled last block) copies it first (copy-on-write):
`allocate` gives the writer a fresh block and queues (src, dst) in `pending_copies`, which the
scheduler hands to the runner to execute before the step's forward:

    parent [7, 2, 9*]  fork ->  child [7, 2, 9*]   (ref counts 2, 2, 2)
    parent writes slot 9.k  ->  parent [7, 2, 4]   copy 9 -> 4, ref count of 9 back to 1
"""
from __future__ import annotations

from collections import OrderedDict

from scaleinfer.errors import ConfigError
from scaleinfer.kv_cache.prefix_cache import PrefixCache
from scaleinfer.request import Request


NULL_BLOCK = -1
"""Block-table entry of a logical block the KV policy freed (never read by the attention views)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ConfigError(f"the KV cache has room for {num_blocks} blocks; raise --kv-cache-memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_cache = PrefixCache(block_size) if enable_prefix_caching else None
        self.pending_copies: list[tuple[int, int]] = []
        """(src, dst) block copies of copy-on-write, executed by the runner before the next forward."""

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by live requests (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_needed(self, request: Request, num_tokens: int) -> int:
        """New blocks `request` needs so that its first `num_tokens` tokens have slots (+1 to copy a
        shared block it is about to write into; and, for an encoder-decoder request, its encoder states:
        the cross blocks, see models/encoder_decoder.py)."""
        cow = 1 if self._shared_write_block(request, num_tokens) is not None else 0
        return max(0, cdiv(num_tokens, self.block_size) - len(request.block_ids)) + cow + self._cross_needed(request)

    def _cross_needed(self, request: Request) -> int:
        return max(0, cdiv(request.num_encoder_tokens, self.block_size) - len(request.cross_block_ids))

    def _shared_write_block(self, request: Request, num_tokens: int) -> int | None:
        """Index in the block table of the block the next write lands in, if other requests share it."""
        if num_tokens <= request.num_computed_tokens:
            return None
        i = request.num_computed_tokens // self.block_size
        if i < len(request.block_ids) and request.block_ids[i] != NULL_BLOCK \
                and self.ref_counts[request.block_ids[i]] > 1:
            return i
        return None

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.num_blocks_needed(request, num_tokens) <= self.num_free_blocks

    # ---- prefix cache ----------------------------------------------------------------------
    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks of a fresh request's prefix; returns how many tokens they cover.

        At least one prompt token is always left to compute, so the step that finishes the prompt
        produces logits.
        """
        if self.prefix_cache is None or request.block_ids or request.num_encoder_tokens:
            return 0   # an encoder-decoder prefix's K/V depend on the encoder states too
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = self.prefix_cache.lookup(request.all_token_ids, max_blocks)
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1
        request.block_ids.extend(hits)
        return len(hits) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens in the prefix cache."""
        if self.prefix_cache is not None and not request.num_encoder_tokens:
            num_full = request.num_computed_tokens // self.block_size
            self.prefix_cache.insert(request.request_id, request.all_token_ids, request.block_ids[:num_full])

    # ---- allocation ------------------------------------------------------------------------
    def allocate(self, request: Request, num_tokens: int) -> None:
        """Give `request` enough blocks for its first `num_tokens` tokens. Caller checked can_allocate."""
        num_new = self.num_blocks_needed(request, num_tokens)
        assert num_new <= self.num_free_blocks, "allocate() without can_allocate()"
        for _ in range(self._cross_needed(request)):
            request.cross_block_ids.append(self._pop_free())
            num_new -= 1
        shared = self._shared_write_block(request, num_tokens)
        if shared is not None:   # copy-on-write of a block forked beams share
            src, dst = request.block_ids[shared], self._pop_free()
            self.ref_counts[src] -= 1
            request.block_ids[shared] = dst
            self.pending_copies.append((src, dst))
            num_new -= 1
        for _ in range(num_new):
            request.block_ids.append(self._pop_free())

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        if self.prefix_cache is not None:
            self.prefix_cache.evict(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def _to_free_queue(self, block_id: int) -> None:
        """A block nobody holds: to the back if it keeps a cached prefix (LRU), else to the front (reused next)."""
        self.free_queue[block_id] = None
        if self.prefix_cache is None or not self.prefix_cache.holds(block_id):
            self.free_queue.move_to_end(block_id, last=False)

    def fork(self, parent: Request, child: Request) -> None:
        """`child` (a new beam of `parent`) shares all of the parent's blocks, self and cross, by reference."""
        assert not child.block_ids and not child.cross_block_ids
        self.hold(parent.block_ids + parent.cross_block_ids)
        child.block_ids.extend(parent.block_ids)
        child.cross_block_ids.extend(parent.cross_block_ids)

    def share_cross(self, source: Request, request: Request) -> None:
        """`request` (a sibling with the same encoder input) takes `source`'s cross blocks by reference: its
        encoder does not run; the blocks go back when the last holder is freed."""
        assert not request.cross_block_ids and source.cross_block_ids
        self.hold(source.cross_block_ids)
        request.cross_block_ids.extend(source.cross_block_ids)

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block (taken by `hold`); blocks nobody holds go back to the free queue."""
        for block_id in reversed(block_ids):
            if block_id == NULL_BLOCK:
                continue
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0
            if self.ref_counts[block_id] == 0:
                self._to_free_queue(block_id)

    def hold(self, block_ids: list[int]) -> None:
        """One more reference to each block (a fork, a sibling, kept_encoder.py); `release` drops it."""
        for block_id in block_ids:
            if block_id != NULL_BLOCK:
                self.ref_counts[block_id] += 1

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies queued since the last call (for this step's runner)."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def trim(self, request: Request, num_tokens: int) -> int:
        """Give back the request's blocks past those its first `num_tokens` tokens need (KV written for
        draft tokens that were rejected); returns how many."""
        keep = cdiv(num_tokens, self.block_size)
        dropped = 0
        while len(request.block_ids) > keep:
            block_id = request.block_ids.pop()
            if block_id == NULL_BLOCK:
                continue
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._to_free_queue(block_id)
            dropped += 1
        return dropped

    def free_dead_blocks(self, request: Request, live_ranges: list[tuple[int, int]]) -> int:
        """Release the request's blocks that hold no live token: every token of the block is before
        the next query and outside `live_ranges` (sorted [start, end) positions). Returns how many."""
        bs, table = self.block_size, request.block_ids
        end = min(request.num_computed_tokens // bs, len(table))  # only full, computed blocks
        freed, r = 0, 0
        for i in range(end):
            if table[i] == NULL_BLOCK:
                continue
            lo, hi = i * bs, (i + 1) * bs
            while r < len(live_ranges) and live_ranges[r][1] <= lo:
                r += 1
            if r < len(live_ranges) and live_ranges[r][0] < hi:
                continue  # some token of the block is still attended
            block_id = table[i]
            table[i] = NULL_BLOCK
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._to_free_queue(block_id)
            freed += 1
        return freed

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks nobody holds go back to the free queue.

        Blocks are released tail first so the head of a prompt (most shareable) is evicted last.
        """
        self.release(request.cross_block_ids + request.block_ids)
        request.block_ids.clear()
        request.cross_block_ids.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.forget_request(request.request_id)
