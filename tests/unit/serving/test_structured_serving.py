"""serving/structured.py and serving/tools.py: request fields -> output constraints, tool plans, the
tool-call parser and its streaming, and the routes over the fake engine (400s before any stream)."""
from __future__ import annotations

import json

import pytest

from scaleinfer.errors import RequestError
from scaleinfer.serving.protocol import ChatCompletionRequest, CompletionRequest
from scaleinfer.serving.structured import structured_params
from scaleinfer.serving.tools import ToolStream, parse_output, prepare_chat, tool_plan

from .test_app import MSGS, assert_openai_error, client, sse_events  # noqa: F401  (fixture)

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MSGS, **kw)


@pytest.mark.parametrize("body, kind, value", [
    (chat(response_format={"type": "json_object"}), "json_object", True),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}),
     "json", SCHEMA),
    (chat(guided_json=SCHEMA), "json", SCHEMA), (chat(guided_regex="a+"), "regex", "a+"),
    (chat(guided_choice=["a", "b"]), "choice", ["a", "b"]),
    (chat(guided_grammar='root ::= "a"'), "grammar", 'root ::= "a"'),
    (CompletionRequest(prompt="x", structured_outputs={"choice": ["y"]}), "choice", ["y"]),
    (CompletionRequest(prompt="x", response_format={"type": "json_object"}), "json_object", True),
])
def test_every_field_maps_to_its_constraint(body, kind, value):
    spec = structured_params(body)
    assert spec.kind == kind and getattr(spec, kind) == value and not spec.any_whitespace


def test_no_constraint_and_whitespace_option():
    assert structured_params(chat()) is None and structured_params(chat(response_format={"type": "text"})) is None
    spec = structured_params(chat(structured_outputs={"json": SCHEMA, "disable_any_whitespace": False}))
    assert spec.any_whitespace


@pytest.mark.parametrize("body", [
    chat(response_format={"type": "json_schema"}), chat(response_format={"type": "json_schema", "json_schema": {}}),
    chat(response_format={"type": "yaml"}), chat(guided_choice=[]), chat(guided_json=SCHEMA, guided_regex="a"),
    chat(response_format={"type": "json_object"}, guided_choice=["a"]), chat(structured_outputs={"regex": 5}),
    chat(structured_outputs={}),
])
def test_malformed_or_conflicting_fields_are_request_errors(body):
    with pytest.raises(RequestError):
        structured_params(body)


def test_tool_plans():
    assert tool_plan(None, None) is None and tool_plan(TOOLS, "none") is None
    assert tool_plan(TOOLS, None).mode == "auto" and tool_plan(TOOLS, None).structured is None
    required = tool_plan(TOOLS, "required").structured.json
    assert required["minItems"] == 1 and len(required["items"]["anyOf"]) == 2 and "maxItems" not in required
    assert tool_plan(TOOLS, "required", parallel_tool_calls=False).structured.json["maxItems"] == 1
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.name == "get_weather" and named.structured.json == TOOLS[0]["function"]["parameters"]


@pytest.mark.parametrize("tools, choice", [
    (None, "required"), (TOOLS, "sometimes"), (TOOLS, {"type": "function", "function": {"name": "nope"}}),
    (TOOLS, {"type": "function"}), ([{"type": "function"}], "auto"),
    ([{"function": {"name": "bad name!"}}], "auto"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "auto"),
])
def test_bad_tools_are_request_errors(tools, choice):
    with pytest.raises(RequestError):
        tool_plan(tools, choice)


def test_parse_auto_output():
    plan = tool_plan(TOOLS, "auto")
    content, calls = parse_output('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                  '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}', plan)
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"} and calls[0]["id"].startswith("call_")
    assert parse_output("Just text.", plan) == ("Just text.", [])
    assert parse_output("<tool_call>{broken", plan) == ("<tool_call>{broken", [])
    fenced = parse_output('```json\n{"name": "now", "arguments": {}}\n```', plan)
    assert fenced[0] is None and fenced[1][0]["function"]["name"] == "now"
    assert parse_output('{"name": "unknown", "arguments": {}}', plan)[1] == []


def test_parse_constrained_outputs():
    calls = parse_output('[{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "a"}}]',
                         tool_plan(TOOLS, "required"))[1]
    assert [c["function"]["name"] for c in calls] == ["now", "get_weather"]
    named = tool_plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    call = parse_output('{"city": "a"}', named)[1][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "a"}'}


@pytest.mark.parametrize("pieces, content, num_calls", [
    (["Hello", " there", "."], "Hello there.", 0),
    (["Sure", ". <tool", "_call>\n{\"name\": \"now\", ", "\"arguments\": {}}\n</tool_call>"], "Sure.", 1),
    (["I use <", "b>bold</b>"], "I use <b>bold</b>", 0),
    (["{\"name\": \"now\",", " \"arguments\": {}}"], "", 1),
    (["{not a call", "}"], "{not a call}", 0),
])
def test_tool_stream_sends_content_and_holds_back_calls(pieces, content, num_calls):
    stream, text, sent = ToolStream(tool_plan(TOOLS, "auto")), "", ""
    for i, piece in enumerate(pieces):
        text += piece
        sent += stream.content_delta(text, i == len(pieces) - 1)
        assert "<tool_call>" not in sent and "<tool_" not in sent[-7:] or num_calls == 0
    rest, calls = stream.finish()
    assert (sent + rest).strip() == content and len(calls) == num_calls


def test_prepare_chat_without_a_tools_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "a"}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    out, kwargs = prepare_chat(messages, tool_plan(TOOLS, "auto"), "{{ messages }}")
    assert kwargs == {} and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in out[0]["content"]
    assert "<tool_call>" in out[2]["content"] and out[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    same, kwargs = prepare_chat(messages, tool_plan(TOOLS, "auto"), "{% if tools %}{{ tools }}{% endif %}")
    assert same is messages and kwargs == {"tools": TOOLS}


# ---- the routes over the fake engine -----------------------------------------------------------
def test_routes_pass_the_constraint_to_the_engine(client):  # noqa: F811
    r = client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "guided_choice": ["a", "b"]})
    assert r.status_code == 200 and client.engine.engine.structured_seen[-1].choice == ["a", "b"]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_regex": "a+"})
    assert r.status_code == 200 and client.engine.seen[-1][1].structured_outputs.regex == "a+"


@pytest.mark.parametrize("stream", [False, True])
def test_an_invalid_grammar_is_a_400_before_any_stream(client, stream):  # noqa: F811
    for route, body in (("/v1/chat/completions", {"messages": MSGS}), ("/v1/completions", {"prompt": "x"})):
        r = client.post(route, json={**body, "guided_regex": "[", "stream": stream, "max_tokens": 2})
        assert "Unclosed" in assert_openai_error(r, 400)["message"]


def test_named_tool_choice_answers_with_tool_calls(client):  # noqa: F811
    state = client.app.state.server
    state.max_model_len = state.max_prompt_chars = state.kv_capacity_tokens = 4096   # room for the tools prompt
    body = {"messages": MSGS, "max_tokens": 3, "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "now"}}}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "abc"}
    assert choice["message"]["content"] is None and choice["finish_reason"] == "length"
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    deltas = [e["choices"][0]["delta"] for e in events]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "now" and calls[0]["id"].startswith("call_")
    assert "".join(tc["function"].get("arguments", "") for tc in calls) == "abc"   # the streamed pieces
    assert not any(d.get("content") for d in deltas)


def test_tool_choice_and_response_format_conflict(client):  # noqa: F811
    r = client.post("/v1/chat/completions", json={"messages": MSGS, "tools": TOOLS, "tool_choice": "required",
                                                  "response_format": {"type": "json_object"}})
    assert "tool" in assert_openai_error(r, 400)["message"]
