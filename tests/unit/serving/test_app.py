"""serving.app over a fake engine: routes, SSE framing, OpenAI error bodies and statuses, limits, metrics."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from scaleinfer.serving.app import build_app
from scaleinfer.serving.generation import ServerConfig

from .fakes import FakeAsyncEngine

MSGS = [{"role": "user", "content": "hi"}]


def make_client(**config) -> tuple[TestClient, FakeAsyncEngine]:
    engine = FakeAsyncEngine()
    app = build_app(engine, ServerConfig(served_model_name="tiny", model_aliases=frozenset({"alias"}), **config))
    return TestClient(app), engine


@pytest.fixture
def client():
    c, engine = make_client()
    with c:
        c.engine = engine
        yield c


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_openai_error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    return err


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny"] and data[0]["object"] == "model"
    assert client.get("/v1/models/tiny").status_code == 200
    assert_openai_error(client.get("/v1/models/other"), 404)


def test_completion(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "abc"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completion_batch_of_prompts_and_n(client):
    body = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "n": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["ab", "bc", "ab", "bc"]


def test_completion_stream_with_usage(client):
    r = client.post("/v1/completions", json={"prompt": "hey", "max_tokens": 4, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "abcd"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat_and_stop(client):
    body = client.post("/v1/chat/completions", json={
        "model": "alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stop": ["d"]}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_ids, params = client.engine.seen[-1]
    assert bytes(i - 3 for i in prompt_ids).decode() == "<user>hi\n<assistant>"
    assert params.max_tokens == 8


def test_chat_stream_role_first_then_content_per_choice(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3, "n": 2, "stream": True})
    chunks = sse_events(r.text)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    texts = {0: "", 1: ""}
    for c in chunks[2:]:
        assert c["object"] == "chat.completion.chunk" and "usage" not in c
        texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert texts == {0: "abc", 1: "bcd"}


def test_chat_logprobs(client):
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2, "logprobs": True, "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["a", "b"] and len(content[0]["top_logprobs"]) == 2


@pytest.mark.parametrize("payload", [
    {"prompt": "x", "max_tokens": -1}, {"prompt": "x", "max_tokens": "lots"}, {"prompt": 5}, {},
    {"prompt": "x", "n": 100000}, {"prompt": "x", "temperature": -1}, {"prompt": "x", "top_p": 0},
    {"prompt": "x", "logprobs": 50}, {"prompt": "x", "echo": True}, {"prompt": "x", "stop": ""},
    {"prompt": "", "max_tokens": 1}, {"prompt": "x" * 64}, {"prompt": [999999]}, {"prompt": "x", "seed": 2**80},
    {"prompt": "x", "stream": "maybe"}, {"prompt": "x", "min_tokens": 20, "max_tokens": 2},
])
def test_bad_completion_requests_get_400(client, payload):
    assert_openai_error(client.post("/v1/completions", json=payload), 400)


@pytest.mark.parametrize("payload", [
    {}, {"messages": []}, {"messages": "hi"}, {"messages": [{"content": "no role"}]},
    {"messages": [{"role": "user", "content": 7}]}, {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
    {"messages": [{"role": "assistant", "content": "BOOM"}]}, {"messages": MSGS, "tools": [{"type": "function"}]},
    {"messages": MSGS, "max_completion_tokens": 0}, {"messages": MSGS, "presence_penalty": 3},
])
def test_bad_chat_requests_get_400(client, payload):
    assert_openai_error(client.post("/v1/chat/completions", json=payload), 400)


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, "user": "u", "store": False,
                                                  "metadata": {"a": "b"}, "whatever": [1]})
    assert r.status_code == 200


def test_invalid_json_and_wrong_content_type(client):
    err = assert_openai_error(client.post("/v1/completions", content=b"{nope",
                                          headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    err = assert_openai_error(client.post("/v1/completions", content=b"prompt=x",
                                          headers={"content-type": "application/x-www-form-urlencoded"}), 400)
    assert "Content-Type" in err["message"]


def test_unknown_model_route_and_method(client):
    assert assert_openai_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
                               404)["code"] == "model_not_found"
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_api_key():
    c, _ = make_client(api_key="sekret")
    with c:
        assert_openai_error(c.get("/v1/models"), 401)
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_queue_full_gets_429():
    c, _ = make_client(max_waiting=1)
    with c:
        c.app.state.server.num_pending = 1
        err = assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 429)
        assert err["code"] == "rate_limit_exceeded"
        c.app.state.server.num_pending = 0
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_tokenize_detokenize(client):
    r = client.post("/tokenize", json={"prompt": "hé"}).json()
    assert r["tokens"] == [104 + 3, 195 + 3, 169 + 3] and r["count"] == 3
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hé"}
    assert client.post("/tokenize", json={"messages": MSGS}).json()["count"] == len("<user>hi\n<assistant>")
    assert_openai_error(client.post("/tokenize", json={}), 400)
    assert_openai_error(client.post("/detokenize", json={"tokens": [-1]}), 400)


def test_metrics(client):
    client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": -3})
    text = client.get("/metrics").text
    assert 'scaleinfer_http_requests_total{model_name="tiny",route="/v1/completions",status="200"} 1.0' in text
    assert 'route="/v1/completions",status="400"} 1.0' in text
    assert 'scaleinfer_prompt_tokens_total{model_name="tiny"} 5.0' in text
    assert 'scaleinfer_generation_tokens_total{model_name="tiny"} 3.0' in text
    assert 'scaleinfer_time_to_first_token_seconds_count{model_name="tiny"} 1.0' in text
    assert 'scaleinfer_request_finished_total{finish_reason="length",model_name="tiny"} 1.0' in text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "max_batch_size",
                 "time_per_output_token_seconds_bucket"):
        assert f"scaleinfer_{name}" in text


def test_metrics_show_speculative_decoding(client):
    from types import SimpleNamespace

    from scaleinfer.spec_decode.controller import SpecStats

    stats = SpecStats()
    stats.record(4, 3)
    stats.record(4, 1)
    client.engine.engine.speculator = SimpleNamespace(stats=stats)
    text = client.get("/metrics").text
    assert 'scaleinfer_spec_decode_num_draft_tokens{model_name="tiny"} 8.0' in text
    assert 'scaleinfer_spec_decode_num_accepted_tokens{model_name="tiny"} 4.0' in text
    assert 'scaleinfer_spec_decode_draft_acceptance_rate{model_name="tiny"} 0.5' in text
    assert 'scaleinfer_spec_decode_mean_accepted_length{model_name="tiny"} 3.0' in text


def test_dead_engine_is_503(client):
    client.engine.is_dead = True
    assert_openai_error(client.get("/health"), 503)
