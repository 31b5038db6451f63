"""Serving benchmark, side by side: `scaleinfer serve` and llama.cpp's server (llama-cpp-python) on the
same GGUF file and the same threads, measured by the same client (`scaleinfer bench serve`).

    python benchmarks/serve_vs_llamacpp.py [--threads 2] [--num-prompts 32] [--request-rate inf] ...

llama.cpp's server runs from its own venv (default /tmp/llamacpp-venv, made with
`python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install 'llama-cpp-python[server]'`)
so that it never enters ours. Each server runs alone; the client forces every output to its set
length (ignore_eos + min_tokens) so that both engines generate the same number of tokens.
llama-cpp-python's server runs one request at a time (no continuous batching); it is started with
--interrupt_requests False so that concurrent requests queue instead of cutting each other off.
Prints a markdown table and writes benchmarks/results/serve-vs-llamacpp-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {timeout_s} s")


def run_bench(label: str, url: str, args, out_dir: str) -> dict:
    filename = f"serve-{label}.json"
    cmd = [sys.executable, "-m", "scaleinfer", "bench", "serve", "--base-url", url, "--label", label,
           "--tokenizer", args.gguf, "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--random-prefix-len", str(args.prefix_len), "--ignore-eos", "--result-dir", out_dir,
           "--result-filename", filename, "--goodput", *args.goodput]
    if args.max_concurrency:
        cmd += ["--max-concurrency", str(args.max_concurrency)]
    subprocess.run(cmd, check=True)
    with open(os.path.join(out_dir, filename)) as f:
        return json.load(f)


def serve(label: str, args, log_dir: str):
    port = free_port()
    if label == "scaleinfer":
        cmd = [sys.executable, "-m", "scaleinfer", "serve", "--model", args.gguf, "--port", str(port),
               "--threads", str(args.threads), "--max-model-len", "2048"]
    else:
        cmd = [args.llamacpp_python, "-m", "llama_cpp.server", "--model", args.gguf, "--port", str(port),
               "--host", "127.0.0.1", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", "2048", "--model_alias", "smollm2",
               # by default a new request interrupts the one being served; queue them instead
               "--interrupt_requests", "False"]
    log = open(os.path.join(log_dir, f"{label}-server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", proc, log


def table(results: list[dict]) -> str:
    cols = [("label", "engine", "{}"), ("completed", "ok", "{}"), ("request_throughput", "req/s", "{:.2f}"),
            ("output_throughput", "out tok/s", "{:.1f}"), ("total_token_throughput", "total tok/s", "{:.1f}"),
            ("mean_ttft_ms", "TTFT mean ms", "{:.0f}"), ("median_ttft_ms", "TTFT p50", "{:.0f}"),
            ("p99_ttft_ms", "TTFT p99", "{:.0f}"), ("mean_tpot_ms", "TPOT mean ms", "{:.1f}"),
            ("p99_tpot_ms", "TPOT p99", "{:.1f}"), ("mean_itl_ms", "ITL mean ms", "{:.1f}"),
            ("p99_itl_ms", "ITL p99", "{:.1f}"), ("mean_e2el_ms", "E2E mean ms", "{:.0f}"),
            ("p99_e2el_ms", "E2E p99", "{:.0f}"), ("request_goodput", "goodput req/s", "{:.2f}"),
            ("loadavg_1m_after", "load after", "{:.1f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the catalog's smollm2-135m-instruct)")
    p.add_argument("--llamacpp-python", default="/tmp/llamacpp-venv/bin/python")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=0)
    p.add_argument("--goodput", nargs="*", default=["ttft:2000", "tpot:200"])
    p.add_argument("--engines", nargs="+", default=["scaleinfer", "llamacpp"])
    args = p.parse_args()
    if args.gguf is None:
        from scaleinfer.weights.loader import open_checkpoint

        args.gguf = str(open_checkpoint("smollm2-135m-instruct").path)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = tempfile.mkdtemp(prefix=f"serve-vs-llamacpp-{stamp}-")  # server logs, per-engine JSON
    os.makedirs(RESULTS, exist_ok=True)
    results = []
    for label in args.engines:
        url, proc, log = serve(label, args, out_dir)
        try:
            wait_healthy(url, proc)
            load_before = os.getloadavg()[0]
            result = run_bench(label, url, args, out_dir)
            # other work on the machine skews the numbers; the 1-minute load average tells
            result["loadavg_1m_before"], result["loadavg_1m_after"] = load_before, os.getloadavg()[0]
            results.append(result)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    print(table(results))
    path = os.path.join(RESULTS, f"serve-vs-llamacpp-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "gguf": os.path.basename(args.gguf), "threads": args.threads,
                   "num_prompts": args.num_prompts, "request_rate": args.request_rate,
                   "max_concurrency": args.max_concurrency, "input_len": args.input_len,
                   "output_len": args.output_len, "prefix_len": args.prefix_len, "cpu_count": os.cpu_count(),
                   "results": [{k: v for k, v in r.items() if k not in ("input_lens", "output_lens")}
                               for r in results]}, f, indent=2)
    print(f"wrote {path} (server logs and per-request lengths in {out_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
