"""The server against an attacker and a careless user, over the ASGI app and a fake engine: body size
limit (413 before reading), tokenization off the event loop, length checks before tokenizing,
admission by sequences (--max-waiting, prompts x n), lone surrogates, the API key on every route."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from scaleinfer.errors import ConfigError
from scaleinfer.serving.app import build_app
from scaleinfer.serving.generation import ServerConfig
from scaleinfer.serving.limits import ServerLimits

from .fakes import FakeAsyncEngine
from .test_app import assert_openai_error, make_client

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client():
    c, engine = make_client()
    with c:
        c.engine = engine
        yield c


def make_app(**config):
    engine = FakeAsyncEngine()
    return build_app(engine, ServerConfig(served_model_name="tiny", **config)), engine


def async_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


async def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


# ---- 1. big requests ---------------------------------------------------------------------------
@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "SLOW", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 1}),
    ("/tokenize", {"prompt": "SLOW"}),
])
def test_a_slow_tokenization_does_not_hold_up_other_requests(route, body):
    app, engine = make_app()
    tok = engine.tokenizer
    tok.hold = threading.Event()

    async def main():
        async with async_client(app) as c:
            slow = asyncio.ensure_future(c.post(route, json=body))
            assert await wait_for(tok.holding.is_set), "the slow request never reached the tokenizer"
            small = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            tok.hold.set()
            return small, await slow

    small, slow = asyncio.run(main())
    assert not tok.hold_timed_out, "the small request waited for the slow tokenization (event loop blocked)"
    assert small.status_code == 200 and slow.status_code == 200, (small.text, slow.text)


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing(client):
    tok = client.engine.tokenizer
    before = tok.calls
    err = assert_openai_error(client.post("/v1/completions", json={"prompt": ["ok", "x" * 65]}), 400)
    assert "context" in err["message"] and "characters" in err["message"]
    err = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "y" * 40}, {"role": "user", "content": "z" * 40}]}), 400)
    assert "characters" in err["message"]
    assert tok.calls == before  # nothing was tokenized


async def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """POST /v1/completions straight into the ASGI app; returns (status, headers, body, receive calls)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    calls = 0
    sent = []

    async def receive():
        nonlocal calls
        calls += 1
        if calls <= len(chunks):
            return {"type": "http.request", "body": chunks[calls - 1], "more_body": calls < len(chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, calls


def test_a_body_over_the_limit_by_content_length_is_413_unread():
    app, _ = make_app(limits=ServerLimits(max_request_bytes=1000))
    status, headers, body, calls = asyncio.run(_asgi_post(app, [(b"content-length", b"100000000")], [b"x"] * 5))
    assert status == 413 and calls == 0
    assert headers[b"connection"] == b"close"
    err = json.loads(body)["error"]
    assert "1000" in err["message"] and "--max-request-bytes" in err["message"]


def test_a_chunked_body_over_the_limit_is_413_when_it_passes_the_limit():
    app, _ = make_app(limits=ServerLimits(max_request_bytes=1000))
    status, headers, body, calls = asyncio.run(_asgi_post(app, [(b"transfer-encoding", b"chunked")],
                                                          [b" " * 300] * 100))
    assert status == 413 and calls == 4  # 1200 bytes read, not 30000
    assert headers[b"connection"] == b"close"


def test_a_body_within_the_limit_is_served():
    app, _ = make_app(limits=ServerLimits(max_request_bytes=1000))
    payload = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    status, _, body, _ = asyncio.run(_asgi_post(app, [(b"transfer-encoding", b"chunked")],
                                                [payload[:5], payload[5:]]))
    assert status == 200 and json.loads(body)["choices"][0]["text"] == "ab"


def test_a_head_over_the_limit_is_431_and_both_body_lengths_are_400():
    app, _ = make_app(limits=ServerLimits(max_header_bytes=2000))
    with TestClient(app) as c:
        r = c.get("/v1/models", headers={"x-big": "y" * 3000})
        assert_openai_error(r, 431)
        assert r.headers["connection"] == "close"
        assert c.get("/v1/models", headers={"x-small": "y" * 100}).status_code == 200
    status, headers, body, calls = asyncio.run(_asgi_post(
        app, [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], [b"0\r\n\r\n"]))
    assert status == 400 and headers[b"connection"] == b"close" and calls == 0
    assert "Transfer-Encoding" in json.loads(body)["error"]["message"]


# ---- 2. admission ------------------------------------------------------------------------------
def _run_held(app, engine, bodies: list[tuple[str, dict]], expect_quick: int):
    """Send the bodies at once while no request can get a first token; once `expect_quick` of them have
    answered (the refused ones), let the engine run; returns the statuses in order."""
    async def main():
        engine.hold_first = asyncio.Event()
        async with async_client(app) as c:
            tasks = [asyncio.ensure_future(c.post(route, json=body)) for route, body in bodies]
            await wait_for(lambda: sum(t.done() for t in tasks) >= expect_quick, 5.0)
            quick = [t.result().status_code for t in tasks if t.done()]
            engine.hold_first.set()
            return quick, [(await t) for t in tasks]

    return asyncio.run(main())


def test_max_waiting_admits_exactly_the_limit_of_concurrent_requests():
    app, engine = make_app(max_waiting=4)
    bodies = [("/v1/completions", {"prompt": f"p{i}", "max_tokens": 1, "stream": i % 2 == 1}) for i in range(10)]
    quick, responses = _run_held(app, engine, bodies, expect_quick=6)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 4 + [429] * 6, statuses
    assert quick == [429] * 6  # the refused ones were answered while the others waited
    assert app.state.server.num_pending == 0


def test_max_waiting_counts_prompts_times_n():
    app, engine = make_app(max_waiting=4)
    bodies = [("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 1}),   # 4 sequences: fills it
              ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 1})]           # 1 more: 429
    quick, responses = _run_held(app, engine, bodies, expect_quick=1)
    assert [r.status_code for r in responses] == [200, 429] and quick == [429]
    assert len(responses[0].json()["choices"]) == 4
    c = TestClient(app)
    err = assert_openai_error(c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2}), 400)
    assert "--max-waiting" in err["message"] and "6" in err["message"]


def test_sequences_per_request_are_capped():
    app, _ = make_app(limits=ServerLimits(max_seqs_per_request=8))
    c = TestClient(app)
    err = assert_openai_error(c.post("/v1/completions", json={"prompt": ["a"] * 300, "n": 4}), 400)
    assert "1200" in err["message"] and "--max-seqs-per-request" in err["message"]
    assert_openai_error(c.post("/v1/chat/completions", json={"messages": MSGS, "n": 9}), 400)
    assert c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 4, "max_tokens": 1}).status_code == 200
    assert app.state.server.num_pending == 0


def test_default_caps_a_300_prompt_times_4_request(client):
    err = assert_openai_error(client.post("/v1/completions", json={"prompt": ["a"] * 300, "n": 4}), 400)
    assert "--max-seqs-per-request" in err["message"]
    assert client.engine.seen == []


# ---- 3. lone surrogates ------------------------------------------------------------------------
@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "a\ud800b"}),
    ("/v1/completions", {"prompt": ["ok", "a\udfffb"]}),
    ("/v1/completions", {"prompt": "ok", "stop": ["\ud800"]}),
    ("/v1/completions", {"prompt": "ok", "model": "m\ud800"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user\ud800", "content": "x"}]}),
    ("/tokenize", {"prompt": "a\ud800b"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
])
def test_a_lone_surrogate_is_400(client, route, body):
    r = client.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400)
    assert "surrogate" in err["message"]


# ---- 6. API key and docs -----------------------------------------------------------------------
def test_the_api_key_covers_every_route_but_health():
    c, _ = make_client(api_key="sekret")
    with c:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/tokenize", "/nowhere"):
            assert_openai_error(c.get(path), 401)
        assert c.get("/health").status_code == 200
        ok = {"Authorization": "Bearer sekret"}
        for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
            assert c.get(path, headers=ok).status_code == 200, path


def test_docs_can_be_turned_off():
    c, _ = make_client(enable_docs=False)
    with c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_openai_error(c.get(path), 404)
        assert c.get("/v1/models").status_code == 200


def test_api_key_sources(tmp_path, monkeypatch):
    from scaleinfer.serving.server import resolve_api_key

    monkeypatch.delenv("SCALEINFER_API_KEY", raising=False)
    assert resolve_api_key(None, None) is None
    assert resolve_api_key("flag", None) == "flag"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, str(key_file)) == "from-file"
    monkeypatch.setenv("SCALEINFER_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env"
    assert resolve_api_key("flag", None) == "flag"  # the command line wins
    with pytest.raises(ConfigError, match="--api-key-file"):
        resolve_api_key("flag", str(key_file))
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_api_key(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        resolve_api_key(None, str(tmp_path / "empty"))


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 2}),   # SamplingParams refuses it
    ("/v1/completions", {"prompt": [[5], [999999]]}),                         # a bad token id, 2nd prompt
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "BOOM"}]}),  # template fails
    ("/v1/chat/completions", {"messages": MSGS, "min_tokens": 20, "max_tokens": 2}),
])
def test_a_request_refused_after_admission_gives_its_place_back(route, body):
    app, _ = make_app(max_waiting=1)
    with TestClient(app) as c:
        for _ in range(3):
            assert_openai_error(c.post(route, json=body), 400)
        assert app.state.server.num_pending == 0
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
