"""`scaleinfer bench serve`: a serving benchmark of any OpenAI-compatible endpoint, with the semantics
of vLLM's benchmark_serving.

Streaming requests from a `random` dataset (set input / output lengths, optional shared prefix) are
sent with Poisson arrivals at --request-rate (inf = all at once), at most --max-concurrency in flight.
Per request: TTFT (send -> first text), ITL (gaps between text chunks), TPOT ((latency - TTFT) /
(output tokens - 1)) and end-to-end latency. Reports mean / median / p99 of each, request and token
throughput, goodput under --goodput SLOs; prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

_METRICS = ("ttft", "tpot", "itl", "e2el")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct",
                   help="scaleinfer model (catalog name, .gguf, HF dir) whose tokenizer builds the prompts")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default=None, help="engine name in the results (default: from the server)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson; inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn from [len * (1 - r), len * (1 + r)]")
    p.add_argument("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by every prompt")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so outputs have the set length")
    p.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:100 e2el:5000 (milliseconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="benchmarks/results")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--no-save", action="store_true", help="print the table only")


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


# ---- dataset -----------------------------------------------------------------------------------
def random_dataset(tokenizer, vocab_size: int, num: int, input_len: int, output_len: int, range_ratio: float,
                   prefix_len: int, seed: int) -> list[BenchRequest]:
    """vLLM's `random` dataset: random ordinary token ids decoded to text, lengths around the set ones."""
    from scaleinfer.bench.workloads import random_ids

    rng = random.Random(seed)
    low = min(1000, vocab_size // 2)  # skip the specials at the bottom of the vocabulary
    prefix = random_ids(rng, prefix_len, vocab_size, low)
    out = []
    for _ in range(num):
        n_in = rng.randint(int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio)))
        n_out = max(1, rng.randint(int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))))
        ids = prefix + random_ids(rng, max(1, n_in), vocab_size, low)
        # decode -> encode can change the count; trim to the target so both engines see the same text
        ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:prefix_len + max(1, n_in)]
        out.append(BenchRequest(tokenizer.decode(ids), len(ids), n_out))
    return out


# ---- one request -------------------------------------------------------------------------------
def _payload(req: BenchRequest, model: str, chat: bool, ignore_eos: bool) -> dict:
    body = {"model": model, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        body |= {"messages": [{"role": "user", "content": req.prompt}], "max_completion_tokens": req.output_len}
    else:
        body |= {"prompt": req.prompt, "max_tokens": req.output_len}
    if ignore_eos:  # vLLM's field, and min_tokens for servers without it (llama.cpp)
        body |= {"ignore_eos": True, "min_tokens": req.output_len}
    return body


def _chunk_text(chunk: dict, chat: bool) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        text += ((choice.get("delta") or {}).get("content") or "") if chat else (choice.get("text") or "")
    return text


async def send_request(client, url: str, headers: dict, req: BenchRequest, model: str, chat: bool,
                       ignore_eos: bool) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=_payload(req, model, chat, ignore_eos), headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                now = time.perf_counter()
                text = _chunk_text(chunk, chat)
                if text:
                    if not res.text:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.text += text
                if chunk.get("usage"):
                    res.output_len = chunk["usage"].get("completion_tokens") or 0
                    res.prompt_len = chunk["usage"].get("prompt_tokens") or res.prompt_len
        res.latency = time.perf_counter() - start
        res.success = bool(res.text) or res.output_len > 0
        if not res.success:
            res.error = "no output"
    except Exception as exc:  # noqa: BLE001 - a failed request is a data point, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
    return res


# ---- the run -----------------------------------------------------------------------------------
async def _arrivals(requests: list[BenchRequest], rate: float, burstiness: float, rng: random.Random):
    for i, req in enumerate(requests):
        yield req
        if i + 1 < len(requests) and rate != math.inf:
            theta = 1.0 / (rate * burstiness)
            await asyncio.sleep(rng.gammavariate(burstiness, theta))


async def run_benchmark(args, requests: list[BenchRequest], model: str, chat: bool,
                        count_tokens) -> tuple[list, float]:
    """Send the requests; returns their results and the wall time. count_tokens(text) stands in for
    the server's usage when it sends none."""
    import httpx

    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        warm = await send_request(client, url, headers, BenchRequest(requests[0].prompt, requests[0].prompt_len, 4),
                                  model, chat, args.ignore_eos)
        if not warm.success:
            raise SystemExit(f"error: the warm-up request to {url} failed: {warm.error}")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(req):
            if sem is None:
                return await send_request(client, url, headers, req, model, chat, args.ignore_eos)
            async with sem:
                return await send_request(client, url, headers, req, model, chat, args.ignore_eos)

        start = time.perf_counter()
        tasks = []
        async for req in _arrivals(requests, args.request_rate, args.burstiness, random.Random(args.seed + 1)):
            tasks.append(asyncio.ensure_future(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    for r in results:
        if r.success and not r.output_len:
            r.output_len = count_tokens(r.text)
    return results, duration


def _parse_slos(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in _METRICS or not ms:
            raise SystemExit(f"error: --goodput {item!r}: write METRIC:MS with METRIC one of {', '.join(_METRICS)}")
        slos[name] = float(ms) / 1000
    return slos


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"mean": statistics.fmean(values) * 1000, "median": statistics.median(values) * 1000,
            "std": statistics.pstdev(values) * 1000, "p99": p99 * 1000}


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    per = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
           "e2el": [r.latency for r in ok]}
    good = 0
    for r in ok:
        values = {"ttft": r.ttft, "e2el": r.latency,
                  "tpot": (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0,
                  "itl": max(r.itl, default=0.0)}
        good += all(values[k] <= v for k, v in slos.items())
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    summary = {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "request_goodput": good / duration if slos else None,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name, values in per.items():
        for stat, value in _stats(values).items():
            summary[f"{stat}_{name}_ms"] = value
    return summary


def format_summary(s: dict) -> str:
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]

    def row(name: str, value, fmt: str = "{:.2f}") -> None:
        lines.append(f"{name:<44}{fmt.format(value):>16}")

    row("Successful requests:", s["completed"], "{}")
    row("Failed requests:", s["failed"], "{}")
    row("Benchmark duration (s):", s["duration_s"])
    row("Total input tokens:", s["total_input_tokens"], "{}")
    row("Total generated tokens:", s["total_output_tokens"], "{}")
    row("Request throughput (req/s):", s["request_throughput"])
    if s["request_goodput"] is not None:
        row("Request goodput (req/s):", s["request_goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in _METRICS:
        lines.append("{:-^60}".format(titles[name]))
        for stat in ("mean", "median", "p99"):
            row(f"{stat.capitalize()} {name.upper()} (ms):", s[f"{stat}_{name}_ms"])
    lines.append("=" * 60)
    return "\n".join(lines)


def _server_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(args) -> int:
    from scaleinfer.weights.loader import open_checkpoint

    chat = args.endpoint.rstrip("/").endswith("chat/completions")
    slos = _parse_slos(args.goodput)
    model = args.model or _server_model(args.base_url, args.api_key)
    ckpt = open_checkpoint(args.tokenizer)
    requests = random_dataset(ckpt.tokenizer, ckpt.config.vocab_size, args.num_prompts, args.random_input_len,
                              args.random_output_len, args.random_range_ratio, args.random_prefix_len, args.seed)
    print(f"{len(requests)} requests to {args.base_url}{args.endpoint} ({model}), rate {args.request_rate}/s, "
          f"max concurrency {args.max_concurrency or 'unlimited'}", file=sys.stderr, flush=True)
    tok = ckpt.tokenizer
    results, duration = asyncio.run(run_benchmark(args, requests, model, chat,
                                                  lambda text: len(tok.encode(text, add_special_tokens=False))))
    summary = summarize(results, duration, slos)
    print(format_summary(summary))
    if args.no_save:
        return 0 if summary["completed"] else 1
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = args.label or model
    record = {"date": stamp, "label": label, "model": model, "base_url": args.base_url, "endpoint": args.endpoint,
              "tokenizer": args.tokenizer, "num_prompts": args.num_prompts,
              "request_rate": "inf" if args.request_rate == math.inf else args.request_rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
              "random_range_ratio": args.random_range_ratio, "random_prefix_len": args.random_prefix_len,
              "ignore_eos": args.ignore_eos, "goodput_slos_ms": {k: v * 1000 for k, v in slos.items()},
              "cpu_count": os.cpu_count(), **summary,
              "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results]}
    os.makedirs(args.result_dir, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    path = os.path.join(args.result_dir, args.result_filename or f"serve-{safe}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if summary["completed"] else 1

