"""`scaleinfer bench`: prefill (pp512), batch-1 decode (tg128), a mixed-length load, load time and
peak RSS, for scaleinfer and HF transformers on the same model and threads, in one run.

Each engine runs in its own subprocess (`python -m scaleinfer.bench.core --worker ENGINE`), so its
load time and peak RSS are its own. Prints a table and writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys


def run_worker(engine: str, model: str, threads: int, num_requests: int, concurrency: int, quick: bool,
               quantization: str = "none", kv_cache_dtype: str = "auto") -> dict:
    from scaleinfer.bench import workloads
    from scaleinfer.bench.engines import HFAdapter, ScaleInferAdapter

    if engine == "scaleinfer":
        adapter = ScaleInferAdapter(model, threads, concurrency, quantization=quantization,
                                    kv_cache_dtype=kv_cache_dtype)
    else:
        from scaleinfer.weights.loader import open_checkpoint

        adapter = HFAdapter(open_checkpoint(model).path, threads, concurrency)
    load_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak while loading
    import psutil

    rss_after_load_mb = psutil.Process().memory_info().rss / 2**20  # what stays (quantized modes free fp32)
    vocab = adapter.vocab_size
    reqs = workloads.mixed_requests(vocab, num_requests)
    if quick:
        reqs = [workloads.MixedRequest(r.prompt_ids[:64], min(r.output_len, 16)) for r in reqs]
    result = {
        "engine": adapter.name,
        "mode": adapter.mode,
        "load_s": adapter.load_s,
        "load_peak_rss_mb": load_rss_mb,
        "rss_after_load_mb": rss_after_load_mb,
        "prefill_tok_s": adapter.prefill(workloads.prefill_prompt(vocab), repeats=1 if quick else 3),
        "decode_tok_s": adapter.decode(workloads.decode_prompt(vocab), repeats=1 if quick else 2),
    }
    mixed = adapter.mixed(reqs)
    result["mixed_tok_s"] = mixed["output_tokens"] / mixed["seconds"]
    result["mixed"] = mixed
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if engine == "scaleinfer":
        result["decode_token_ids"] = adapter.decode_token_ids
        result["kv_tokens_per_gib"] = (1 << 30) // adapter.llm.engine.kv_bytes_per_token
    return result


def _spawn_llamacpp(args) -> dict:
    """llama.cpp through llama-cpp-python, in its own interpreter (see llamacpp_worker.py)."""
    from scaleinfer.bench import workloads
    from scaleinfer.weights.loader import open_checkpoint

    ckpt = open_checkpoint(args.model)
    vocab = ckpt.config.vocab_size
    reqs = workloads.mixed_requests(vocab, args.num_requests)
    if args.quick:
        reqs = [workloads.MixedRequest(r.prompt_ids[:64], min(r.output_len, 16)) for r in reqs]
    job = {"gguf": ckpt.path, "threads": args.threads, "prefill_ids": workloads.prefill_prompt(vocab),
           "decode_ids": workloads.decode_prompt(vocab), "decode_tokens": workloads.DECODE_TOKENS,
           "mixed": [[r.prompt_ids, r.output_len] for r in reqs], "repeats": 1 if args.quick else 3}
    worker = os.path.join(os.path.dirname(__file__), "llamacpp_worker.py")
    print("running llama.cpp ...", file=sys.stderr, flush=True)
    proc = subprocess.run([args.llamacpp_python, worker], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spawn(engine: str, args, mode: str = "none") -> dict:
    quantization, _, kv_dtype = mode.partition(":")
    cmd = [sys.executable, "-m", "scaleinfer.bench.core", "--worker", engine, "--model", args.model,
           "--threads", str(args.threads), "--num-requests", str(args.num_requests),
           "--concurrency", str(args.concurrency), "--quantization", quantization,
           "--kv-cache-dtype", kv_dtype or "auto"] + (["--quick"] if args.quick else [])
    print(f"running {engine} {mode if engine == 'scaleinfer' else ''}...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    cols = [("engine", "engine", "{}"), ("mode", "mode", "{}"), ("load_s", "load s", "{:.2f}"),
            ("load_peak_rss_mb", "peak RSS at load MB", "{:.0f}"), ("rss_after_load_mb", "RSS after load MB", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
            ("prefill_tok_s", "pp512 tok/s", "{:.1f}"), ("decode_tok_s", "tg128 tok/s", "{:.1f}"),
            ("mixed_tok_s", "mixed tok/s", "{:.1f}"), ("kv_tokens_per_gib", "KV tokens/GiB", "{}")]
    ref = next((r.get("decode_token_ids") for r in results if r["engine"] == "llama.cpp"), None)
    if ref:  # same greedy tokens on the same GGUF? (a sanity check of both sides, not a speed figure)
        cols.append(("agree", f"tg128 tokens = llama.cpp's", "{}"))
        for r in results:
            mine = r.get("decode_token_ids")
            if mine:
                same = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
                r["agree"] = f"first {same}/{len(ref)}"
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join(fmt.format(r[key]) if key in r else "-" for key, _, fmt in cols) + " |")
    baselines = [r for r in results if r["engine"] != "scaleinfer"]
    if baselines:
        speed = [("prefill_tok_s", "pp512"), ("decode_tok_s", "tg128"), ("mixed_tok_s", "mixed")]
        lines += ["", "| scaleinfer mode | " + " | ".join(f"{s} vs {b['engine']}" for b in baselines for _, s in speed)
                  + " |", "|" + "---|" * (1 + len(speed) * len(baselines))]
        for r in results:
            if r["engine"] == "scaleinfer":
                lines.append(f"| {r['mode']} | " + " | ".join(f"{r[k] / b[k]:.2f}x" for b in baselines for k, _ in speed)
                             + " |")
    return "\n".join(lines)


def main(args) -> int:
    threads = args.threads or os.cpu_count() or 1
    args.threads = threads
    modes = [m.strip() for m in (args.modes or args.quantization or "none").split(",") if m.strip()]
    results = [_spawn("scaleinfer", args, mode) for mode in modes]
    if args.llamacpp_python:
        results.append(_spawn_llamacpp(args))
    if not args.no_hf:
        results.append(_spawn("hf", args))
    table = format_table(results)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.output_dir, f"core-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "model": args.model, "threads": threads, "machine": platform.machine(),
                   "cpu_count": os.cpu_count(), "num_requests": args.num_requests,
                   "concurrency": args.concurrency, "quick": args.quick, "modes": modes,
                   "table": table, "results": results}, f, indent=2)
    print(f"wrote {path}")
    return 0


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=["scaleinfer", "hf"])
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--quantization", default="none")
    p.add_argument("--kv-cache-dtype", default="auto")
    a = p.parse_args()
    print(json.dumps(run_worker(a.worker, a.model, a.threads, a.num_requests, a.concurrency, a.quick,
                                a.quantization, a.kv_cache_dtype)))


if __name__ == "__main__":
    _worker_main()
