"""bench.serve (the serving benchmark client): the random dataset, one streamed request against the app
(fake engine), and the summary."""
from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from scaleinfer.bench import serve as bench
from scaleinfer.serving.app import build_app
from scaleinfer.serving.generation import ServerConfig

from .fakes import VOCAB, FakeAsyncEngine, FakeTokenizer


def test_random_dataset_lengths_and_shared_prefix():
    reqs = bench.random_dataset(FakeTokenizer(), VOCAB, 8, input_len=20, output_len=5, range_ratio=0.5,
                                prefix_len=6, seed=0)
    assert len(reqs) == 8
    assert all(1 <= r.prompt_len <= 6 + 30 and 2 <= r.output_len <= 7 for r in reqs)
    assert len({r.prompt[:2] for r in reqs}) == 1


@pytest.mark.parametrize("chat", [False, True])
def test_send_request_measures_a_stream(chat):
    app = build_app(FakeAsyncEngine(), ServerConfig("tiny"))
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await bench.send_request(client, "http://t" + endpoint, {}, bench.BenchRequest("hi", 2, 5),
                                            "tiny", chat, ignore_eos=True)

    res = asyncio.run(go())
    assert res.success and res.text == "abcde" and res.output_len == 5 and res.prompt_len > 0
    assert len(res.itl) == 4 and res.latency >= res.ttft > 0


def test_send_request_reports_http_errors():
    app = build_app(FakeAsyncEngine(), ServerConfig("tiny"))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await bench.send_request(client, "http://t/v1/completions", {}, bench.BenchRequest("hi", 2, 5),
                                            "other-model", False, ignore_eos=False)

    res = asyncio.run(go())
    assert not res.success and "404" in res.error


def test_summary_statistics_and_goodput():
    results = [bench.RequestResult(True, 10, 5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
               bench.RequestResult(True, 10, 5, ttft=0.3, latency=1.3, itl=[0.25] * 4),
               bench.RequestResult(False, error="HTTP 500")]
    s = bench.summarize(results, duration=2.0, slos={"ttft": 0.2})
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 20, 10)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 5.0 and s["request_goodput"] == 0.5
    assert math.isclose(s["mean_ttft_ms"], 200) and math.isclose(s["mean_tpot_ms"], 175)
    assert math.isclose(s["p99_e2el_ms"], 1300) and s["errors"] == ["HTTP 500"]
    assert "Serving Benchmark Result" in bench.format_summary(s)
