"""The measurements of `scaleinfer bench distributed`, all through a server's OpenAI endpoint (so every
layout, a router in front of replicas too, is measured the same way): batch-1 decode, prefill of one
long prompt, a mixed load at a set concurrency, and the router's overhead per request.

Prompts are token ids (`prompt: [ids]` of /v1/completions), outputs run to their set length
(`ignore_eos`), greedy; the servers run without prefix caching, so repeats recompute.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import httpx

from scaleinfer.bench.serve import BenchRequest, run_benchmark, send_request, summarize

CLIENT_TIMEOUT = httpx.Timeout(1800.0, connect=30.0)


@dataclass(frozen=True)
class Workload:
    prefill_ids: list[int]
    decode_ids: list[int]
    decode_tokens: int
    mixed: list[tuple[list[int], int]]
    """(prompt ids, output tokens) of the mixed load."""
    concurrency: int
    overhead_requests: int


async def _one(url: str, ids: list[int], max_tokens: int, model: str):
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
        req = BenchRequest(ids, len(ids), max_tokens)  # type: ignore[arg-type]  (ids are a valid prompt)
        res = await send_request(client, url + "/v1/completions", {}, req, model, False, True)
    if not res.success:
        raise RuntimeError(f"request to {url} failed: {res.error}")
    return res


def decode_tok_s(url: str, w: Workload, model: str) -> float:
    """Tokens per second after the first, of one greedy stream of w.decode_tokens."""
    res = asyncio.run(_one(url, w.decode_ids, w.decode_tokens, model))
    return (res.output_len - 1) / max(res.latency - res.ttft, 1e-9)


def prefill_tok_s(url: str, w: Workload, model: str) -> float:
    """Prompt tokens per second of one request's prompt (to its first token)."""
    res = asyncio.run(_one(url, w.prefill_ids, 1, model))
    return len(w.prefill_ids) / (res.ttft or res.latency)


def mixed(url: str, w: Workload, model: str) -> dict:
    """The mixed load, streamed, w.concurrency in flight: throughput and TTFT percentiles."""
    args = SimpleNamespace(base_url=url, endpoint="/v1/completions", api_key=None, ignore_eos=True,
                           max_concurrency=w.concurrency, request_rate=float("inf"), burstiness=1.0, seed=0)
    requests = [BenchRequest(ids, len(ids), n) for ids, n in w.mixed]  # type: ignore[arg-type]
    results, duration = asyncio.run(run_benchmark(args, requests, model, False, lambda text: 0))
    s = summarize(results, duration, {})
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} of the mixed requests failed: {s['errors']}")
    return {"output_tok_s": s["output_throughput"], "ttft_p50_ms": s["median_ttft_ms"],
            "ttft_p99_ms": s["p99_ttft_ms"], "duration_s": duration, "output_tokens": s["total_output_tokens"]}


async def _latencies(client: httpx.AsyncClient, urls: list[str], body: dict, n: int) -> list[list[float]]:
    """n rounds of one request to each URL in turn (alternating, so drift hits both alike)."""
    out: list[list[float]] = [[] for _ in urls]
    for _ in range(n):
        for i, url in enumerate(urls):
            start = time.perf_counter()
            r = await client.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            out[i].append(time.perf_counter() - start)
    return out


def router_overhead(direct: str, routed: str, w: Workload, model: str) -> dict:
    """Latency of a one-token request straight to a server and through a router in front of it."""
    body = {"model": model, "prompt": w.decode_ids, "max_tokens": 1, "temperature": 0}

    async def run():
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
            await _latencies(client, [direct, routed], body, 2)  # warm both paths
            return await _latencies(client, [direct, routed], body, w.overhead_requests)

    d, r = asyncio.run(run())
    diffs = [b - a for a, b in zip(d, r)]
    return {"requests": len(d), "direct_median_ms": statistics.median(d) * 1000,
            "routed_median_ms": statistics.median(r) * 1000, "overhead_median_ms": statistics.median(diffs) * 1000,
            "overhead_mean_ms": statistics.fmean(diffs) * 1000}


def pipeline_seconds(url: str) -> tuple[float, float]:
    """The driver's (stage-0 compute, waiting for logits) seconds since start, from /metrics (0, 0 without PP)."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    values = {}
    for line in text.splitlines():
        for name in ("scaleinfer_pipeline_stage0_compute_seconds", "scaleinfer_pipeline_logits_wait_seconds"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return (values.get("scaleinfer_pipeline_stage0_compute_seconds", 0.0),
            values.get("scaleinfer_pipeline_logits_wait_seconds", 0.0))
