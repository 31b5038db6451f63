"""The official `openai` client against real servers: response_format (json_schema, json_object), vLLM's
guided_* fields, and tools (required, named, auto; streamed and not) on SmolLM2 (tools as a system
prompt) and Qwen2.5-0.5B (tools through its chat template); concurrent requests with different grammars
and free ones; an invalid schema is a 400, streamed or not."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

TIMEOUT_S = 120

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "maximum": 120}}}
WEATHER = {"type": "object", "required": ["city"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                            "parameters": {"type": "object", "required": ["tz"], "properties": {
                                                "tz": {"type": "string", "maxLength": 20}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _parameters(name: str) -> dict:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def _person(client, model, stream=False, **kw):
    return _ask(client, model, [{"role": "user", "content": "Invent a person. Answer in JSON."}], stream, max_tokens=48,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                        "strict": True}}, **kw)


def _ask(client, model, messages, stream=False, **kw) -> tuple[str | None, list, str]:
    """(content, tool calls as (name, arguments dict), finish_reason), streamed or not."""
    if not stream:
        choice = client.chat.completions.create(model=model, messages=messages, temperature=0, **kw).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, ["", ""])
            entry[0] += tc.function.name or ""
            entry[1] += tc.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content or None, [(n, json.loads(a)) for n, a in calls.values()], reason


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_and_object(client, model_name, stream):
    content, _, reason = _person(client, model_name, stream)
    assert reason == "stop"
    jsonschema.validate(json.loads(content), PERSON)
    content, _, _ = _ask(client, model_name, [{"role": "user", "content": "Give a JSON list of two colors."}],
                         stream, max_tokens=40, response_format={"type": "json_object"})
    assert content.startswith("{")   # a prefix the grammar allows even when max_tokens cuts it


def test_guided_fields_on_chat_and_completions(client, model_name):
    content, _, _ = _ask(client, model_name, [{"role": "user", "content": "Sentiment of: 'What a great day!'"}],
                         max_tokens=5, extra_body={"guided_choice": ["positive", "negative"]})
    assert content in ("positive", "negative")
    text = client.completions.create(model=model_name, prompt="Call me at", max_tokens=20, temperature=0.7, seed=1,
                                     extra_body={"guided_regex": r"\d{3}-\d{4}"}).choices[0].text
    assert re.fullmatch(r"\d{3}-\d{4}", text)
    content, _, _ = _ask(client, model_name, ASK, max_tokens=8, extra_body={"structured_outputs": {"grammar":
                                                                            'root ::= "yes" | "no"'}})
    assert content in ("yes", "no")


def test_concurrent_grammars_and_free_requests(client, model_name):
    jobs = [lambda: _person(client, model_name), lambda: _person(client, model_name, True),
            lambda: _ask(client, model_name, ASK, max_tokens=12),
            lambda: _ask(client, model_name, ASK, max_tokens=6, extra_body={"guided_choice": ["sun", "rain"]}),
            lambda: _ask(client, model_name, ASK, tools=TOOLS, tool_choice="required", max_tokens=60,
                         parallel_tool_calls=False)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [f.result(TIMEOUT_S) for f in [pool.submit(j) for j in jobs]]
    for i, (content, calls, reason) in enumerate(results):
        kind = i % 5
        if kind in (0, 1):
            jsonschema.validate(json.loads(content), PERSON)
        elif kind == 2:
            assert content and reason in ("stop", "length")
        elif kind == 3:
            assert content in ("sun", "rain")
        else:
            assert reason == "tool_calls" and calls
            for name, args in calls:
                jsonschema.validate(args, _parameters(name))


@pytest.mark.parametrize("stream", [False, True])
def test_tools_without_a_tools_template(client, model_name, stream):
    content, calls, reason = _ask(client, model_name, ASK, stream, tools=TOOLS, max_tokens=60,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert content is None and reason == "tool_calls" and calls[0][0] == "get_weather"
    jsonschema.validate(calls[0][1], WEATHER)
    content, calls, reason = _ask(client, model_name, ASK, stream, tools=TOOLS, max_tokens=40, tool_choice="auto")
    assert (reason == "tool_calls" and calls) or (content and not calls)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_arguments_equal_the_whole_call(client, model_name, choice):
    kw = dict(model=model_name, messages=ASK, temperature=0, max_tokens=60, tools=TOOLS, tool_choice=choice,
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    names, args, pieces, ids = {}, {}, 0, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.id:
                ids[tc.index] = tc.id
            names[tc.index] = names.get(tc.index, "") + (tc.function.name or "")
            if tc.function.arguments:
                args[tc.index] = args.get(tc.index, "") + tc.function.arguments
                pieces += 1
    assert [(c.function.name, c.function.arguments) for c in whole] == [(names[i], args[i]) for i in sorted(args)]
    assert pieces > 1 and all(i.startswith("call_") for i in ids.values())   # streamed piece by piece


@pytest.mark.parametrize("stream", [False, True])
def test_a_dead_end_finishes_with_error(client, model_name, stream):
    content, _, reason = _ask(client, model_name, ASK, stream, max_tokens=8,
                              extra_body={"guided_grammar": 'root ::= "a" [^\\x00-\\U0010FFFF]'})
    assert (content, reason) == ("a", "error")


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                        "minimum": 9, "maximum": 1}}}},
    {"extra_body": {"guided_regex": "(unclosed"}}, {"extra_body": {"guided_grammar": "root ::= nowhere"}},
    {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
     "tool_choice": "required"},
])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_constraints_are_400(client, model_name, body, stream):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=ASK, max_tokens=4, stream=stream, **body)


ENDLESS = {"chat": ("/chat/completions", {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
    "name": "tree", "schema": {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}}}}),
           "completions": ("/completions", {"prompt": "Say a.", "guided_grammar": 'root ::= "a" root'})}


@pytest.mark.parametrize("endpoint", list(ENDLESS))
@pytest.mark.parametrize("stream", [False, True])
def test_grammars_with_no_finite_output_are_400_and_the_next_request_works(server, http, client, model_name,
                                                                            endpoint, stream):
    """A grammar / schema that can never finish is refused before generation (not written to max_tokens),
    with a one-line message; a good request right after is served."""
    path, body = ENDLESS[endpoint]
    r = http.post(server.v1 + path, json={"model": model_name, "max_tokens": 64, "stream": stream, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert ("no finite instance" if endpoint == "chat" else "no finite output") in message and "\n" not in message
    content, _, reason = _ask(client, model_name, ASK, stream, max_tokens=8,
                              extra_body={"guided_grammar": 'root ::= "a" root | "b"'})
    assert (reason, bool(re.fullmatch("a*b", content))) in (("stop", True), ("length", False))
    assert re.fullmatch("a*b?", content)   # the recursive grammar with an exit is served


@pytest.fixture(scope="module")
def qwen(start_server):
    with start_server("--model", "qwen2.5-coder-0.5b-instruct", "--kv-cache-memory", "96MiB") as server:
        yield openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.mark.parametrize("stream", [False, True])
def test_qwen_tools_through_its_template(qwen, stream):
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        content, calls, reason = _ask(qwen, "qwen2.5-coder-0.5b-instruct", ASK, stream, tools=TOOLS,
                                      tool_choice=choice, max_tokens=60)
        assert reason == "tool_calls" and calls and content is None
        for name, args in calls:
            jsonschema.validate(args, _parameters(name))
    content, calls, reason = _ask(qwen, "qwen2.5-coder-0.5b-instruct", ASK, stream, tools=TOOLS, max_tokens=60)
    assert (reason == "tool_calls" and calls) or (content and not calls)


def test_qwen_tool_result_round_trip(qwen):
    model = "qwen2.5-coder-0.5b-instruct"
    first = qwen.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0,
                                         max_tokens=60).choices[0].message
    call = first.tool_calls[0]
    messages = [*ASK, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}]
    reply = qwen.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=40).choices[0]
    assert reply.message.content and not reply.message.tool_calls
