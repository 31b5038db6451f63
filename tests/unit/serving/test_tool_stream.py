"""Tool calls stream as OpenAI streams them: a head (id, type, name), then the arguments piece by piece
as the model writes them; the concatenated pieces equal the non-streamed call's arguments, in every
tool_choice mode (named, required, auto with <tool_call> tags, auto with a bare call object)."""
import json
from types import SimpleNamespace

import pytest

from scaleinfer.serving.tool_json import scan_array, scan_call, value_end
from scaleinfer.serving.tools import ToolStream, parse_output, tool_plan, tool_stream_choices

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _stream(text: str, choice, step: int = 3):
    """Feed `text` in pieces of `step` characters; the chunks' choices as the server sends them."""
    stream, chunks = ToolStream(tool_plan(TOOLS, choice)), []
    for end in list(range(step, len(text), step)) + [len(text)]:
        final = end == len(text)
        delta = SimpleNamespace(index=0, finish_reason="stop" if final else None)
        output = SimpleNamespace(outputs=[SimpleNamespace(text=text[:end])])
        chunks += tool_stream_choices(stream, delta, output)
    return chunks


def _collect(chunks):
    content, calls, arg_deltas, reason = "", {}, {}, None
    for ch in chunks:
        d = ch["delta"]
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in tc:
                assert entry["id"] is None, "a call's head is sent once"
                entry["id"] = tc["id"]
            fn = tc.get("function", {})
            entry["name"] += fn.get("name", "")
            if fn.get("arguments"):
                entry["arguments"] += fn["arguments"]
                arg_deltas[tc["index"]] = arg_deltas.get(tc["index"], 0) + 1
        reason = ch["finish_reason"] or reason
    return content, calls, arg_deltas, reason


@pytest.mark.parametrize("choice, text, incremental", [
    (NAMED, '{"city": "Oslo, the capital of Norway"}', True),
    ("required", '[{"name": "get_weather", "arguments": {"city": "Paris \\"Île\\" {x}"}}, '
                 '{"name": "now", "arguments": {}}]', True),
    ("auto", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', True),
    ("auto", '<tool_call>\n{"arguments": {"city": "Rome"}, "name": "get_weather"}\n</tool_call>', False),
    ("auto", '{"name": "get_weather", "arguments": {"city": "Lima"}}', False),     # bare: whole at the end
    ("auto", '<tool_call>\n{"name": "now"}\n</tool_call>', False),                   # no arguments: "{}"
    ("auto", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', False),
])
def test_streamed_arguments_equal_the_whole_call(choice, text, incremental):
    plan = tool_plan(TOOLS, choice)
    whole_content, whole = parse_output(text, plan)
    assert whole, "the non-streamed parse finds the calls"
    content, calls, arg_deltas, reason = _collect(_stream(text, choice))
    assert reason == "tool_calls" and (content.strip() or None) == whole_content
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(w["function"]["name"], w["function"]["arguments"]) for w in whole]
    assert all(c["id"].startswith("call_") for c in calls.values())
    for c in calls.values():
        json.loads(c["arguments"])
    if incremental:   # the first call's arguments came in several pieces, not one
        assert arg_deltas[0] > 3


def test_heads_go_out_before_the_arguments_finish():
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    stream = ToolStream(tool_plan(TOOLS, "required"))
    part = text[:text.index("Par") + 2]
    first = stream.call_deltas(part)
    assert first[0]["id"].startswith("call_") and first[0]["function"]["name"] == "get_weather"
    assert first[0]["function"]["arguments"] == '{"city": "Pa'


def test_scanner_on_partial_text():
    assert value_end('"a\\"b" x', 0) == 6 and value_end('{"a": [1, "}"]}', 0) == 15 and value_end("12", 0) is None
    call = scan_call('{"name": "now", "arguments": {"a": [1', 0)
    assert call.name == "now" and call.args_end is None and call.end is None
    assert call.arguments('{"name": "now", "arguments": {"a": [1') == '{"a": [1'
    assert scan_call('{"na', 0).name is None and scan_call('x', 0).malformed
    calls = scan_array('[{"name": "a", "arguments": {}}, {"name": "b"')
    assert [c.name for c in calls] == ["a", "b"] and calls[0].end is not None and calls[1].end is None


def test_cut_short_call_streams_no_content():
    text = '[{"name": "get_weather", "arguments": {"city": "Pa'
    stream, chunks = ToolStream(tool_plan(TOOLS, "required")), []
    for end in (10, 30, len(text)):
        final = end == len(text)
        delta = SimpleNamespace(index=0, finish_reason="length" if final else None)
        chunks += tool_stream_choices(stream, delta, SimpleNamespace(outputs=[SimpleNamespace(text=text[:end])]))
    content, calls, _, reason = _collect(chunks)
    assert reason == "length" and not content and calls[0]["arguments"] == '{"city": "Pa'
