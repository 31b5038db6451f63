"""Cross blocks of finished encoder-decoder requests, kept for a later request with the same encoder input.

Whisper's temperature fallback decodes a 30 s window again at a higher temperature when the first
decode looks wrong (too repetitive, too unlikely); the encoder input is the same object each time. A
request made with `keep_encoder_output=True` leaves its cross blocks here when it finishes (one more
reference each, BlockManager.hold); a later request with that very encoder input object takes them
(the references move to it) and its encoder does not run. An entry goes back to the free blocks when its
owner releases it (the transcription moved to its next window), when the scheduler needs the blocks for
running work (oldest first, before any preemption), or when more than `capacity` are kept.

    window w, T=0.0  runs the encoder, finishes   -> kept[w] = cross blocks (refs +1)
    window w, T=0.2  admitted: takes kept[w]      -> no encoder run; its blocks, refs unchanged
    window w, T=0.2  finishes                     -> kept[w] again
    next window                                   -> release(w): blocks back to the free queue
"""
from __future__ import annotations

from collections import OrderedDict

from scaleinfer.kv_cache.block_manager import BlockManager
from scaleinfer.request import Request


class KeptEncoderOutputs:
    def __init__(self, block_manager: BlockManager, capacity: int) -> None:
        self.block_manager = block_manager
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[int, tuple[object, list[int]]] = OrderedDict()
        """id(encoder_input) -> (encoder_input, cross block ids); the strong reference keeps the id unique."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_blocks(self) -> int:
        return sum(len(blocks) for _, blocks in self._entries.values())

    def keep(self, request: Request) -> None:
        """Hold the finished request's cross blocks (a sibling sharing them may have kept them already)."""
        key = id(request.encoder_input)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is request.encoder_input:
            self._entries.move_to_end(key)
            return
        self.block_manager.hold(request.cross_block_ids)
        self._entries[key] = (request.encoder_input, list(request.cross_block_ids))
        while len(self._entries) > self.capacity:
            self.release_oldest()

    def take(self, request: Request) -> bool:
        """Give a request without cross blocks the kept ones of its encoder input; False: none kept."""
        key = id(request.encoder_input)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not request.encoder_input or request.cross_block_ids:
            return False
        del self._entries[key]
        request.cross_block_ids.extend(entry[1])   # the kept references are the request's now
        return True

    def release(self, encoder_input: object) -> None:
        """Give back the blocks kept for `encoder_input` (nothing if none are)."""
        entry = self._entries.get(id(encoder_input))
        if entry is not None and entry[0] is encoder_input:
            del self._entries[id(encoder_input)]
            self.block_manager.release(entry[1])

    def release_oldest(self) -> bool:
        """Give back the oldest entry's blocks; False when nothing is kept."""
        if not self._entries:
            return False
        _, (_, blocks) = self._entries.popitem(last=False)
        self.block_manager.release(blocks)
        return True
