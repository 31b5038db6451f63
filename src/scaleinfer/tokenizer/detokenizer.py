"""IncrementalDetokenizer: output ids -> text deltas that never split a character or leak a stop string."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scaleinfer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas that never split a character or leak a stop string.

    Decoding (as TGI and vLLM do): each call decodes only a short window, the tokens from
    `prefix_offset` on, and compares it with the same window without the new tokens; the difference is
    the new text. While that text ends in U+FFFD (an unfinished UTF-8 sequence: a CJK character or
    emoji split across byte tokens) nothing moves, so the next token completes it and it appears once.

    Stop strings: new text joins `pending`, the part not yet released. A stop string found there ends
    the request (cut before it, or after it with include_stop_str_in_output). Otherwise the longest
    suffix of `pending` that could begin a stop string is held back and the rest released; text before
    that point can never become part of a stop string, so nothing released is ever taken back.
    Work per call is O(window + longest stop string), independent of the output length.
    """

    _PROMPT_CONTEXT = 6
    """Prompt tokens decoded along with the first outputs, so a leading space decodes as in the full text."""
    _MAX_UNFINISHED = 16
    """Tokens to wait for an unfinished character before giving up and releasing U+FFFD (garbage output)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_string: str | None = None
        """The stop string that ended the output, or None."""
        self._ids = list(prompt_token_ids[-self._PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._released: list[str] = []
        self._pending = ""
        self._finished = False

    @property
    def text(self) -> str:
        """All text released so far (the full output once finished, without a stop string unless asked)."""
        if len(self._released) != 1:  # join lazily: add_tokens stays O(new text)
            self._released = ["".join(self._released)]
        return self._released[0]

    @property
    def finished(self) -> bool:
        """A stop string was found or flush() was called; further tokens are ignored."""
        return self._finished

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Feed new token ids; returns the newly releasable text (often "", never a partial character)."""
        if self._finished or not new_ids:
            return ""
        self._ids.extend(new_ids)
        new_text = self._decode_new()
        return self._release(new_text) if new_text else ""

    def flush(self) -> str:
        """The request ended without a stop string: release whatever was held back."""
        if self._finished:
            return ""
        self._finished = True
        delta, self._pending = self._pending, ""
        self._released.append(delta)
        return delta

    def _decode_new(self) -> str:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        full = decode(self._ids[self._prefix_offset:], skip)
        if full.endswith("\ufffd") and len(self._ids) - self._read_offset < self._MAX_UNFINISHED:
            return ""  # an unfinished character: wait for the token that completes it
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _release(self, new_text: str) -> str:
        if not self.stop:
            self._released.append(new_text)
            return new_text
        pending = self._pending + new_text
        hits = [(pending.find(s), n, s) for n, s in enumerate(self.stop)]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            start, _, stop = min(hits)  # earliest in the text; ties go to the first listed
            end = start + len(stop) if self.include_stop_str_in_output else start
            self.stop_string, self._finished, self._pending = stop, True, ""
            self._released.append(pending[:end])
            return pending[:end]
        hold = 0
        for s in self.stop:  # longest suffix of pending that starts some stop string
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        delta, self._pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
        self._released.append(delta)
        return delta
