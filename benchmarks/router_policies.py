"""The router's policies side by side: which one should be the default of `--router-policy`.

    python benchmarks/router_policies.py --model smollm2-135m-instruct --rounds 2

Two `scaleinfer serve` replicas (prefix caching on, a KV cache that holds about half the shared prefixes)
and one `scaleinfer router` per policy in front of the same two replicas, so every policy sees the same
engines. Two loads, each run through every router in turn (the order rotating each round; the shared
machine drifts, so compare within a round):

- distinct: prompts with nothing in common, lengths drawn over a range (load balancing alone);
- shared prefixes: GROUPS system prompts of PREFIX tokens, each request one of them plus its own
  question (multi-tenant system prompts): where a request lands decides whether its prefix is cached.
  Every (round, policy) draws fresh prefixes, so no router profits from another's cached blocks.

Reports output tok/s and TTFT (mean, p50, p99) per policy and load; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import tempfile
from types import SimpleNamespace

from scaleinfer.bench.distributed import _launch
from scaleinfer.bench.serve import BenchRequest, _server_model, run_benchmark, summarize
from scaleinfer.bench.soak.server import stop
from scaleinfer.bench.workloads import random_ids
from scaleinfer.serving.router.policies import POLICIES


def distinct(vocab: int, n: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(random_ids(rng, rng.randint(64, 448), vocab), 0, rng.randint(16, 96))  # type: ignore[arg-type]
            for _ in range(n)]


def shared(vocab: int, n: int, groups: int, prefix: int, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    heads = [random_ids(rng, prefix, vocab) for _ in range(groups)]
    return [BenchRequest(rng.choice(heads) + random_ids(rng, 24, vocab), 0, 24)  # type: ignore[arg-type]
            for _ in range(n)]


def measure(url: str, requests: list[BenchRequest], concurrency: int) -> dict:
    args = SimpleNamespace(base_url=url, endpoint="/v1/completions", api_key=None, ignore_eos=True,
                           max_concurrency=concurrency, request_rate=float("inf"), burstiness=1.0, seed=0)
    for r in requests:
        r.prompt_len = len(r.prompt)
    model = _server_model(url, None)
    results, duration = asyncio.run(run_benchmark(args, requests, model, False, lambda text: 0))
    s = summarize(results, duration, {})
    return {k: s[k] for k in ("completed", "failed", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                              "p99_ttft_ms", "duration_s")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--replica-threads", type=int, default=1)
    p.add_argument("--kv-cache-memory", default="64MiB", help="per replica (holds about half the prefixes)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prefix", type=int, default=256, help="tokens of each shared system prompt")
    p.add_argument("--output-dir", default="benchmarks/results")
    a = p.parse_args()
    from scaleinfer.weights.loader import open_checkpoint

    vocab = open_checkpoint(a.model).config.vocab_size
    logs = tempfile.mkdtemp(prefix="router-policies-")
    engine = ["--model", a.model, "--threads", str(a.replica_threads), "--kv-cache-memory", a.kv_cache_memory,
              "--max-model-len", "1024", "--log-interval", "3600"]
    procs, results = [], {name: {"distinct": [], "shared": []} for name in POLICIES}
    try:
        replicas = [_launch("serve", engine, f"{logs}/r{i}.log", 900) for i in range(2)]
        procs += replicas
        routers = {name: _launch("router", ["--policy", name, *[x for r in replicas for x in ("--replica", r.url)]],
                                 f"{logs}/router-{name}.log", 120) for name in POLICIES}
        procs += routers.values()
        names = list(POLICIES)
        for rnd in range(a.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for k, name in enumerate(order):
                print(f"round {rnd + 1}: {name}", file=sys.stderr, flush=True)
                results[name]["distinct"].append(measure(routers[name].url, distinct(vocab, a.requests, rnd),
                                                         a.concurrency))
                load = shared(vocab, a.requests, a.groups, a.prefix, 1000 * rnd + k + 1)
                results[name]["shared"].append(measure(routers[name].url, load, a.concurrency))
    finally:
        for proc in procs:
            stop(proc.proc, 60)
    report(a, results, logs)
    return 0


def report(a, results: dict, logs: str) -> None:
    lines = ["| policy | load | round | output tok/s | TTFT mean ms | TTFT p50 ms | TTFT p99 ms |", "|---" * 7 + "|"]
    for name, loads in results.items():
        for load, runs in loads.items():
            for rnd, r in enumerate(runs):
                lines.append(f"| {name} | {load} | {rnd + 1} | {r['output_throughput']:.1f} | "
                             f"{r['mean_ttft_ms']:.0f} | {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.output_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(a.output_dir, f"router-policies-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "args": vars(a), "loadavg": os.getloadavg(), "logs": logs, "results": results,
                   "table": table}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
