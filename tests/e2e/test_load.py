"""Load and lifecycle against the real server: 32 concurrent streams with continuous batching visible in
/metrics, and a client that disconnects mid-stream gets its KV blocks freed at once."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_32_concurrent_streams_complete_and_batch(server, model_name):
    import openai

    async def one(client, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": f"Say a word about the number {i}."}],
            max_tokens=8, temperature=0, stream=True)
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32 and all(text and reason in ("stop", "length") for text, reason in results)
    assert server.metric("scaleinfer_max_batch_size") > 1
    assert sum(server.metric("scaleinfer_request_finished_total", 0, finish_reason=r) for r in ("stop", "length")) >= 32
    assert server.metric("scaleinfer_time_to_first_token_seconds_count") >= 32


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_disconnect_mid_stream_frees_kv_blocks(server, model_name):
    assert wait_for(lambda: server.metric("scaleinfer_num_requests_running") == 0)
    idle = server.metric("scaleinfer_kv_cache_free_blocks")
    body = {"model": model_name, "prompt": "Write a long story about a dragon. " * 8, "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                assert server.metric("scaleinfer_kv_cache_free_blocks") < idle  # the request holds blocks
                break  # leaving iter_lines closes the response: the client is gone
    start = time.monotonic()
    assert wait_for(lambda: server.metric("scaleinfer_kv_cache_free_blocks") == idle, 5.0), \
        "KV blocks were not freed after the client disconnected"
    assert time.monotonic() - start < 5.0
    assert server.metric("scaleinfer_num_requests_running") == 0
    assert server.metric("scaleinfer_request_finished_total", finish_reason="abort") >= 1


def test_non_streaming_disconnect_aborts_too(server, model_name):
    idle = server.metric("scaleinfer_kv_cache_free_blocks")
    body = {"model": model_name, "prompt": "Tell me everything about the sea.", "max_tokens": 400,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert wait_for(lambda: server.metric("scaleinfer_kv_cache_free_blocks") == idle, 5.0)
