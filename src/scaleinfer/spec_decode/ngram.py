"""N-gram prompt lookup: propose the tokens that followed the most recent earlier occurrence of the
sequence's last n tokens (vLLM's `ngram` method, llama.cpp's lookup decoding). No model, no state.

It pays where the output repeats its input: editing code, summarizing or quoting a passage, filling a
template. On free text it rarely finds a match and proposes nothing, which costs nothing.
"""
from __future__ import annotations

import numpy as np


def ngram_propose(token_ids: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of `token_ids`,
    trying n = max_n down to min_n; [] when no suffix recurs."""
    length = len(token_ids)
    if k <= 0 or length < min_n + 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = arr[length - n:]
        # Candidate starts i (i + n < length, so something follows) whose window equals the suffix.
        starts = np.flatnonzero(arr[:length - n] == suffix[0])
        for j in range(1, n):
            if starts.size == 0:
                break
            starts = starts[arr[starts + j] == suffix[j]]
        if starts.size:
            i = int(starts[-1]) + n   # the most recent occurrence: the text being copied right now
            return arr[i:i + k].tolist()
    return []
