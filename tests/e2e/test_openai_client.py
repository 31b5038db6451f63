"""The official `openai` client against the real server: chat and completions, streaming and not,
n, stop, seed, logprobs, usage, and a Chinese conversation streamed chunk by chunk."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHINESE = [{"role": "system", "content": "你是一个乐于助人的助手。"},
           {"role": "user", "content": "请用中文介绍一下北京的历史和著名景点。"}]


def test_models_lists_the_served_model(client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]


def test_chat_non_streaming(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming_and_reports_usage(client, model_name):
    kw = dict(model=model_name, messages=QUESTION, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streaming_and_not(client, model_name):
    kw = dict(model=model_name, prompt="The three primary colors are", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert whole.usage.completion_tokens == 10 or whole.choices[0].finish_reason == "stop"


def test_n_choices(client, model_name):
    r = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=6, n=3,
                                  temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 18  # all choices counted, prompt once
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=6, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert sorted(streamed) == [0, 1] and all(streamed.values())


def test_stop_string_ends_the_text_before_it(client, model_name):
    kw = dict(model=model_name, prompt="Count: 1, 2, 3, 4, 5,", max_tokens=16, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    stop = free.strip()[:2] if free.strip() else ","
    r = client.completions.create(**kw, stop=[stop])
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert free.startswith(r.choices[0].text)


def test_seed_reproducibility(client, model_name):
    kw = dict(model=model_name, messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    assert a == b
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should give some different samples"


def test_logprobs(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-3  # greedy picks the top token
    legacy = client.completions.create(model=model_name, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_chinese_stream_equals_non_stream_without_replacement_chars(client, model_name):
    kw = dict(model=model_name, messages=CHINESE, max_tokens=48, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
              if c.choices]
    assert "".join(pieces) == whole
    assert "\ufffd" not in whole and all("\ufffd" not in p for p in pieces)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in whole), f"expected Chinese text, got {whole!r}"


def test_tokenize_detokenize_round_trip(server, model_name, http):
    ids = http.post(server.url + "/tokenize", json={"model": model_name, "prompt": "Hello, 世界"}).json()["tokens"]
    assert http.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello, 世界"
