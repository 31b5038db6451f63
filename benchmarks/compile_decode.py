"""Does torch.compile help our batch-1 decode? One run measures, each case in a fresh process:

  program    the default: the whole decoder step in one C++ call (csrc/decode_step.cpp); nothing to compile
  eager      the module path (nn.Module forward per layer), as run for int8 KV and for Gemma 3
  compiled   the same with every decoder layer's forward wrapped in torch.compile(dynamic=True)

for SmolLM2 (fp32 KV; int8 KV; and pure torch, SCALEINFER_FUSED_OPS=0, where dynamo sees the whole layer)
and Gemma 3. "first call" is the first 8-token generate (compile included), with an empty inductor
cache and again with the cache the first compile left. Prints a table, writes JSON under
benchmarks/results/.

    .venv/bin/python benchmarks/compile_decode.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = [  # (label, model, kv dtype, SCALEINFER_FUSED_OPS, path)
    ("SmolLM2 fp32, fp32 KV", "smollm2-135m-instruct", "auto", "1", "program"),
    ("SmolLM2 fp32, fp32 KV, pure torch", "smollm2-135m-instruct", "auto", "0", "eager"),
    ("SmolLM2 fp32, fp32 KV, pure torch", "smollm2-135m-instruct", "auto", "0", "compiled"),
    ("SmolLM2 fp32, int8 KV", "smollm2-135m-instruct", "int8", "1", "eager"),
    ("SmolLM2 fp32, int8 KV", "smollm2-135m-instruct", "int8", "1", "compiled"),
    ("Gemma 3 270M fp32", "gemma-3-270m", "auto", "1", "eager"),
    ("Gemma 3 270M fp32", "gemma-3-270m", "auto", "1", "compiled"),
]


def child(model: str, kv: str, path: str, threads: int) -> dict:
    import torch

    from scaleinfer import LLM, SamplingParams

    llm = LLM(model, threads=threads, kv_cache_memory="64MiB", max_model_len=512, kv_cache_dtype=kv)
    m = llm.engine.model
    if path != "program":
        llm.engine.runner.lean_decode = False   # Gemma has no decode program; this turns SmolLM2's off
    if path == "compiled":
        for layer in m.layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)
    prompt = "The capital of France is"
    t = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    first = time.perf_counter() - t
    rates, text = [], ""
    for _ in range(3):
        t = time.perf_counter()
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))[0]
        rates.append(128 / (time.perf_counter() - t))
        text = out.outputs[0].text
    return {"first_call_s": round(first, 2), "decode_tok_s": round(sorted(rates)[1], 1), "text": text[:60]}


def run_case(model, kv, fused, path, threads, cache_dir) -> dict:
    env = dict(os.environ, SCALEINFER_FUSED_OPS=fused, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, __file__, "--child", model, kv, path, "--threads", str(threads)],
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"case {model} {kv} {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "KV", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return 0
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, kv, fused, path in CASES:
            cache = os.path.join(tmp, f"{model}-{kv}-{fused}")
            r = run_case(model, kv, fused, path, args.threads, cache)
            if path == "compiled":   # again, now that the first run left its compiled code in the cache
                r["first_call_cached_s"] = run_case(model, kv, fused, path, args.threads, cache)["first_call_s"]
            rows.append({"case": label, "path": path, **r})
            cached = f" (cached {r['first_call_cached_s']:.1f} s)" if "first_call_cached_s" in r else ""
            print(f"{label:36s} {path:9s} first call {r['first_call_s']:6.1f} s{cached:18s} decode "
                  f"{r['decode_tok_s']:6.1f} tok/s", flush=True)
    print("\n| case | path | first call s (cached) | decode tok/s (median of 3) |\n|---|---|---|---|")
    for r in rows:
        cached = f" ({r['first_call_cached_s']})" if "first_call_cached_s" in r else ""
        print(f"| {r['case']} | {r['path']} | {r['first_call_s']}{cached} | {r['decode_tok_s']} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("compile-decode-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
