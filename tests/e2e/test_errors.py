"""Bad input against the real server: each malformed request gets a 4xx with an OpenAI error body,
never a 5xx; a hypothesis fuzzer throws a bounded number of random bodies at both generation routes."""
from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "hi"}]


def check_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


@pytest.mark.parametrize("route,body", [
    ("completions", {"prompt": "x", "max_tokens": "ten"}),
    ("completions", {"prompt": "x", "max_tokens": -5}),
    ("completions", {"prompt": {"text": "x"}}),
    ("completions", {"prompt": "x", "n": 10**9}),
    ("completions", {"prompt": "x", "temperature": "hot"}),
    ("completions", {"prompt": "x", "stop": [1, 2]}),
    ("completions", {"prompt": "x", "logprobs": 1000}),
    ("completions", {"prompt": "x " * 600}),
    ("completions", {"prompt": [10**9]}),
    ("chat/completions", {"max_tokens": 4}),
    ("chat/completions", {"messages": []}),
    ("chat/completions", {"messages": [{"role": "user"}], "max_tokens": "x"}),
    ("chat/completions", {"messages": [{"role": "user", "content": ["a", 1]}]}),
    ("chat/completions", {"messages": MSGS, "n": 1000}),
    ("chat/completions", {"messages": MSGS, "top_p": 7}),
    ("chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}),
    ("chat/completions", {"messages": MSGS, "response_format": {"type": "xml"}}),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    ("chat/completions", [1, 2, 3]),
    ("chat/completions", "just a string"),
    ("chat/completions", None),
])
def test_malformed_requests_get_4xx(server, route, body, http):
    check_error(http.post(f"{server.v1}/{route}", json=body), 400)


def test_invalid_json_and_wrong_content_type(server, http):
    url = server.v1 + "/chat/completions"
    check_error(http.post(url, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    check_error(http.post(url, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    check_error(http.post(url, content=b'{"messages": []}', headers={"content-type": "text/plain"}), 400)
    check_error(http.post(url, data={"messages": "x"}), 400)
    check_error(http.post(url), 400)


def test_unknown_model_is_404(server, http):
    err = check_error(http.post(server.v1 + "/chat/completions", json={"model": "gpt-4o", "messages": MSGS}), 404)
    assert err["code"] == "model_not_found"


def test_unknown_route_and_method(server, http):
    check_error(http.get(server.v1 + "/engines"), 404)
    check_error(http.put(server.v1 + "/completions", json={}), 405)


def test_prompt_longer_than_the_context_is_400(server, model_name, http):
    err = check_error(http.post(server.v1 + "/completions", json={"model": model_name,
                                                                   "prompt": "hello " * 2000}), 400)
    assert "context" in err["message"]


# ---- fuzzer ------------------------------------------------------------------------------------
junk = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                 st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                             max_size=2))
common = {  # plausible values of every sampling field
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 0.5), "n": st.integers(1, 2), "seed": st.integers(0, 2**31),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(), "stream": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 40000), max_size=2), "min_tokens": st.integers(0, 2),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": st.text(max_size=5),
}
message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": st.one_of(st.text(max_size=20), st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=10)}), min_size=1, max_size=2))})
valid_chat = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3), "max_completion_tokens": st.integers(1, 4)},
    optional={**common, "logprobs": st.booleans()})
valid_completion = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 40000), min_size=1, max_size=5)),
     "max_tokens": st.integers(1, 4)},
    optional={**common, "logprobs": st.integers(0, 5)})


@st.composite
def maybe_broken(draw, valid):
    """A plausible body, or one with a single field (possibly a required one) replaced by junk."""
    body = draw(valid)
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(body) + ["unknown_field"]))
        value = draw(junk)
        if key.startswith("max_") and value is None:
            value = -1  # null = up to the context: valid but slow; keep the fuzzer fast
        body[key] = value
    return body


chat_body = maybe_broken(valid_chat)
completion_body = maybe_broken(valid_completion)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def check_no_5xx(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        check_error(r)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")


@FUZZ
@given(body=chat_body)
def test_fuzz_chat(server, body, http):
    check_no_5xx(http.post(server.v1 + "/chat/completions", json=body, timeout=120))


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(server, body, http):
    check_no_5xx(http.post(server.v1 + "/completions", json=body, timeout=120))
