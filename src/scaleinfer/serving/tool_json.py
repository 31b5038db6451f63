"""Where the tool calls are in a model's output while it is still being written: a small JSON scanner
for call objects ({"name": ..., "arguments": {...}}) that reports the name once its string is closed and
the span of the arguments value as far as it goes, so streamed arguments can go out piece by piece.

The arguments text of a call (streamed or not) is the arguments value exactly as the model wrote it
(an object, usually), or the decoded string when the model wrote the arguments as a JSON string: so the
concatenated stream deltas equal the non-streamed call's arguments.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

_WS = " \t\r\n"


@dataclass
class CallScan:
    name: str | None = None
    """The call's function name, once its string is complete."""
    args_start: int | None = None
    """Where the arguments value starts in the text (None: not reached, or no arguments key)."""
    args_end: int | None = None
    """Where it ends (exclusive); None while it is still being written."""
    end: int | None = None
    """After the call object's closing brace; None while it is still being written."""
    malformed: bool = False

    def arguments(self, text: str, final: bool = False) -> str | None:
        """The arguments text so far: the raw object / array as it grows; a string or scalar value only
        once complete (a string is decoded). At the end of a complete call without arguments: "{}"."""
        if self.args_start is None:
            return "{}" if final and self.end is not None else None
        raw = text[self.args_start:self.args_end] if self.args_end is not None else text[self.args_start:]
        if raw[:1] in "{[":
            return raw
        if self.args_end is None:
            return None
        value = json.loads(raw)
        return value if isinstance(value, str) else raw


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def value_end(s: str, i: int) -> int | None:
    """The index after the JSON value that starts at s[i]; None when the text ends before it does."""
    c = s[i]
    if c == '"':
        j = i + 1
        while j < len(s):
            if s[j] == "\\":
                j += 2
            elif s[j] == '"':
                return j + 1
            else:
                j += 1
        return None
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < len(s):
            ch = s[j]
            if in_str:
                if ch == "\\":
                    j += 1
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}]" + _WS:     # number, true, false, null
        j += 1
    return j if j < len(s) else None


def scan_call(s: str, i: int) -> CallScan:
    """The call object that starts at s[i] (after optional whitespace), as far as the text goes."""
    out = CallScan()
    i = skip_ws(s, i)
    if i >= len(s):
        return out
    if s[i] != "{":
        out.malformed = True
        return out
    i += 1
    while True:
        i = skip_ws(s, i)
        if i >= len(s):
            return out
        if s[i] == "}":
            out.end = i + 1
            return out
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            out.malformed = True
            return out
        key_end = value_end(s, i)
        if key_end is None:
            return out
        key = json.loads(s[i:key_end])
        i = skip_ws(s, key_end)
        if i < len(s) and s[i] != ":":
            out.malformed = True
            return out
        i = skip_ws(s, i + 1)
        if i >= len(s):
            return out
        end = value_end(s, i)
        if key == "name" and end is not None:
            name = json.loads(s[i:end])
            out.name = name if isinstance(name, str) else None
        elif key == "arguments" or (key == "parameters" and out.args_start is None):
            out.args_start, out.args_end = i, end
        if end is None:
            return out
        i = end


def scan_array(s: str, i: int = 0) -> list[CallScan]:
    """The call objects of a JSON array of calls ("required" tool choice) as far as the text goes."""
    i = skip_ws(s, i)
    if i >= len(s) or s[i] != "[":
        return []
    calls, i = [], i + 1
    while True:
        i = skip_ws(s, i)
        if i >= len(s) or s[i] == "]":
            return calls
        if s[i] == ",":
            i += 1
            continue
        call = scan_call(s, i)
        calls.append(call)
        if call.end is None or call.malformed:
            return calls
        i = call.end
