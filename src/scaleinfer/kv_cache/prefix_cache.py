"""PrefixCache: maps a chain hash of full token blocks to the physical block that holds their K/V.

The hash of block i covers every token up to the end of block i (its parent's hash plus its own
tokens), so a hit on block i implies the whole prefix matches. Only full blocks are cached.
Pure Python; owned by the BlockManager.
"""
from __future__ import annotations


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._block_of_key: dict[tuple, int] = {}
        self._key_of_block: dict[int, tuple] = {}
        self._hashes: dict[str, list[int]] = {}  # request id -> chain hashes of its full blocks

    def lookup(self, token_ids: list[int], max_blocks: int) -> list[int]:
        """Physical blocks holding the longest cached prefix of `token_ids` (at most max_blocks)."""
        hits: list[int] = []
        parent = 0
        bs = self.block_size
        for i in range(max_blocks):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            block_id = self._block_of_key.get(key)
            if block_id is None:
                break
            hits.append(block_id)
            parent = hash(key)
        return hits

    def insert(self, request_id: str, token_ids: list[int], full_block_ids: list[int]) -> None:
        hashes = self._hashes.setdefault(request_id, [])
        start = len(hashes)
        if start >= len(full_block_ids):
            return
        bs = self.block_size
        for i in range(start, len(full_block_ids)):
            parent = hashes[-1] if hashes else 0
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            hashes.append(hash(key))
            block_id = full_block_ids[i]
            if block_id >= 0 and key not in self._block_of_key and block_id not in self._key_of_block:
                self._block_of_key[key] = block_id
                self._key_of_block[block_id] = key

    def evict(self, block_id: int) -> None:
        """The block is being reused for other tokens: forget what it held."""
        key = self._key_of_block.pop(block_id, None)
        if key is not None:
            del self._block_of_key[key]

    def holds(self, block_id: int) -> bool:
        """Whether the block is registered as holding a cached prefix."""
        return block_id in self._key_of_block

    def forget_request(self, request_id: str) -> None:
        self._hashes.pop(request_id, None)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_key)
