"""`scaleinfer bench`: prefill (pp512), batch-1 decode (tg128), a mixed-length load, load time and
peak RSS, for scaleinfer (each mode), llama.cpp and HF transformers on the same model and threads,
in one run.

Each engine runs in its own subprocess (`python -m scaleinfer.bench.core --worker ENGINE`), so its
load time and peak RSS are its own. The workers start one after another and each first measures its
load and the mixed load alone; then they stay up and the parent asks them for pp512 and tg128 rounds
in turn (round-robin, the order rotating each round), because these shared machines drift by +-20%
within minutes: the ratios in the table are medians of same-round ratios. Prints a table and writes
JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys


def run_worker(engine: str, model: str, threads: int, num_requests: int, concurrency: int, quick: bool,
               quantization: str = "none", kv_cache_dtype: str = "auto"):
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
    prefill_ids, decode_ids = workloads.prefill_prompt(vocab), workloads.decode_prompt(vocab)
    adapter.prefill_once(prefill_ids)  # warm-up; the timed rounds come from the parent (serve_rounds)
    adapter.decode_once(decode_ids)
    result = {
        "engine": adapter.name,
        "mode": adapter.mode,
        "load_s": adapter.load_s,
        "load_peak_rss_mb": load_rss_mb,
        "rss_after_load_mb": rss_after_load_mb,
    }
    mixed = adapter.mixed(reqs)
    result["mixed_tok_s"] = mixed["output_tokens"] / mixed["seconds"]
    result["mixed"] = mixed
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if engine == "scaleinfer":
        result["kv_tokens_per_gib"] = (1 << 30) // adapter.llm.engine.kv_bytes_per_token
        result["kernel_paths"] = kernel_paths(quantization)
    return result, adapter, prefill_ids, decode_ids


def kernel_paths(quantization: str) -> str:
    """Which CPU code paths a mode's linears ran in this worker, e.g. "w4a8 decode: avx512vnni-512,
    prefill: amx-int8"."""
    from scaleinfer.quantization.int4 import w4a8_kernel_paths
    from scaleinfer.kernels import cpu_kernels

    ops = cpu_kernels()
    if ops is None:
        return f"{quantization}: torch fallback (no C++ kernels)"
    if quantization == "w4a8":
        p = w4a8_kernel_paths()
        return f"w4a8 decode: {p['decode']}, prefill: {p['prefill']} (AMX {p['amx']})"
    if quantization == "w8a8":
        import torch

        return (f"w8a8 decode: int8 weight-only ({ops.isa()}), prefill: torch._int_mm (oneDNN, CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()}, max ISA {os.environ.get('ONEDNN_MAX_CPU_ISA', 'all')})")
    return f"{quantization}: {ops.isa()}"


def serve_rounds(adapter, prefill_ids: list[int], decode_ids: list[int], lines=sys.stdin, out=sys.stdout) -> None:
    """Answer the parent's `prefill` / `decode` lines with one timed round each (a JSON line)."""
    for line in lines:
        cmd = line.strip()
        if cmd == "prefill":
            res = {"prefill_tok_s": len(prefill_ids) / adapter.prefill_once(prefill_ids)}
        elif cmd == "decode":
            per_token, ids = adapter.decode_once(decode_ids)
            res = {"decode_tok_s": 1.0 / per_token, "decode_token_ids": ids}
        else:
            res = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(res), file=out, flush=True)


class _Worker:
    """A running engine process: its one-off results (the first JSON line it prints), then rounds."""

    def __init__(self, name: str, cmd: list[str], first_input: str | None = None, env: dict | None = None):
        self.name = name
        print(f"running {name} ...", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        if first_input is not None:
            self.proc.stdin.write(first_input + "\n")
            self.proc.stdin.flush()
        self.result = self._read()
        self.result.update(prefill_rounds=[], decode_rounds=[])

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        while line and not line.lstrip().startswith("{"):  # a library may print to stdout
            line = self.proc.stdout.readline()
        if not line:  # the worker exited (or closed stdout): its stderr says why
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            raise RuntimeError(f"{self.name} benchmark failed:\n{self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def round(self) -> None:
        for cmd, key in (("prefill", "prefill_tok_s"), ("decode", "decode_tok_s")):
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            res = self._read()
            self.result[key.replace("tok_s", "rounds")].append(res[key])
            if "decode_token_ids" in res:
                self.result["decode_token_ids"] = res["decode_token_ids"]

    def finish(self) -> dict:
        self.proc.stdin.close()
        self.proc.wait(60)
        r = self.result
        r["prefill_tok_s"] = statistics.median(r["prefill_rounds"])
        r["decode_tok_s"] = statistics.median(r["decode_rounds"])
        return r


def _spawn_llamacpp(args) -> _Worker:
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
           "mixed": [[r.prompt_ids, r.output_len] for r in reqs]}
    worker = os.path.join(os.path.dirname(__file__), "llamacpp_worker.py")
    return _Worker("llama.cpp", [args.llamacpp_python, worker], json.dumps(job))


NO_AMX = "no-amx"
"""Mode suffix `@no-amx` (e.g. `w4a8@no-amx`): that worker runs without AMX tiles (the w4a8 GEMM on 512-bit
VNNI, oneDNN capped at AVX512_CORE_VNNI), to measure the AMX path against the same mode in one run."""


def _spawn(engine: str, args, mode: str = "none") -> _Worker:
    spec, _, variant = mode.partition("@")
    quantization, _, kv_dtype = spec.partition(":")
    if variant not in ("", NO_AMX):
        raise SystemExit(f"unknown mode variant @{variant} in {mode!r}; the only one is @{NO_AMX}")
    cmd = [sys.executable, "-m", "scaleinfer.bench.core", "--worker", engine, "--model", args.model,
           "--threads", str(args.threads), "--num-requests", str(args.num_requests),
           "--concurrency", str(args.concurrency), "--quantization", quantization,
           "--kv-cache-dtype", kv_dtype or "auto"] + (["--quick"] if args.quick else [])
    env = None
    if variant == NO_AMX:
        cmd.append("--no-amx")
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX512_CORE_VNNI")
    return _Worker(f"{engine} {mode}" if engine == "scaleinfer" else engine, cmd, env=env)


def run_rounds(workers: list[_Worker], rounds: int) -> list[dict]:
    """pp512 + tg128 from every engine in turn, `rounds` times, starting one engine later each round."""
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}: pp512 and tg128 of each engine", file=sys.stderr, flush=True)
        k = r % len(workers)
        for w in workers[k:] + workers[:k]:
            w.round()
    return [w.finish() for w in workers]


def _ratio(r: dict, b: dict, key: str) -> float:
    """r's speed over b's: the median of same-round ratios where both have rounds, else the plain ratio."""
    rounds = key.replace("tok_s", "rounds")
    if r.get(rounds) and b.get(rounds) and len(r[rounds]) == len(b[rounds]):
        return statistics.median(x / y for x, y in zip(r[rounds], b[rounds]))
    return r[key] / b[key]


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
                lines.append(f"| {r['mode']} | " + " | ".join(f"{_ratio(r, b, k):.2f}x" for b in baselines
                                                               for k, _ in speed) + " |")
        rounds = max((len(r.get("decode_rounds", [])) for r in results), default=0)
        if rounds > 1:
            lines += ["", f"pp512 / tg128: medians of {rounds} interleaved rounds; ratios: medians of same-round "
                          "ratios; mixed: one run each."]
    return "\n".join(lines)


def main(args) -> int:
    threads = args.threads or os.cpu_count() or 1
    args.threads = threads
    modes = [m.strip() for m in (args.modes or args.quantization or "none").split(",") if m.strip()]
    workers = []
    try:
        for mode in modes:
            workers.append(_spawn("scaleinfer", args, mode))
        if args.llamacpp_python:
            workers.append(_spawn_llamacpp(args))
        if not args.no_hf:
            workers.append(_spawn("hf", args))
        results = run_rounds(workers, 1 if args.quick else args.rounds)
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    table = format_table(results)
    paths = [f"- {r['mode']}: {r['kernel_paths']}" for r in results if r.get("kernel_paths")]
    if paths:
        table += "\n\nkernel paths:\n" + "\n".join(paths)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.output_dir, f"core-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "model": args.model, "threads": threads, "machine": platform.machine(),
                   "cpu_count": os.cpu_count(), "num_requests": args.num_requests,
                   "concurrency": args.concurrency, "quick": args.quick, "modes": modes,
                   "rounds": 1 if args.quick else args.rounds,
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
    p.add_argument("--no-amx", action="store_true", help="w4a8's prefill GEMM on 512-bit VNNI, not AMX")
    a = p.parse_args()
    if a.no_amx:
        from scaleinfer.kernels import cpu_kernels

        ops = cpu_kernels()
        if ops is not None and ops.a8_gemm_path() == "amx-int8":
            ops.set_a8_gemm_path("vnni512")
    result, adapter, prefill_ids, decode_ids = run_worker(a.worker, a.model, a.threads, a.num_requests,
                                                          a.concurrency, a.quick, a.quantization, a.kv_cache_dtype)
    if a.no_amx:
        result["mode"] += f"@{NO_AMX}"
    print(json.dumps(result), flush=True)
    serve_rounds(adapter, prefill_ids, decode_ids)


if __name__ == "__main__":
    _worker_main()
