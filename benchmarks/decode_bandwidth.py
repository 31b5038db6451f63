"""How close does batch-1 decode get to the memory bandwidth? Bytes each decode token reads, times tok/s,
against the machine's streaming limit.

  bytes/token  every Linear's decode tensors in its quantized layout (the DecodeSpec the C++ decode step
               reads: weights, scales, mins, bias; the LM head included) + the KV cache read at the mean
               context of the run (prompt + half the generated tokens)
  GB/s         bytes/token x tok/s (decode only: the first token, the prompt's, is not timed)
  limit        a `torch.sum` over a 2 GiB float32 tensor on the same threads (best of 10), GB/s (also over
               512 MiB: this machine reports a 480 MiB L3, so smaller models' weights may stay in it)

Each case runs in a fresh process (a 1.5B model in float32 needs ~6.5 GB). With --llamacpp-python, llama.cpp
decodes the same GGUF (its bytes/token: the GGUF's tensors that a token reads, + its f16 KV cache).
Prints a table and writes JSON under benchmarks/results/.

    .venv/bin/python benchmarks/decode_bandwidth.py --threads 2 \
        --llamacpp-python .venv-llamacpp/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
PROMPT_TOKENS = 16


def _prompt(vocab_size: int) -> list[int]:
    import random

    rng = random.Random(1)
    return [rng.randrange(1000, vocab_size) for _ in range(PROMPT_TOKENS)]


def streaming_limit(threads: int) -> dict:
    """GB/s of a 2-thread torch.sum over 512 MiB and over 2 GiB of float32 (best and median of 10). The 2 GiB
    one is the limit used: this machine reports a 480 MiB L3, which a 512 MiB tensor partly fits in."""
    import torch

    torch.set_num_threads(threads)
    result = {}
    for label, numel in (("512MiB", 128 << 20), ("2GiB", 512 << 20)):
        x = torch.ones(numel)
        torch.sum(x)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            torch.sum(x)
            times.append(time.perf_counter() - t)
        result[label] = {"best_gb_s": x.nbytes / min(times) / 1e9,
                         "median_gb_s": x.nbytes / statistics.median(times) / 1e9}
        del x
    return {**result, "best_gb_s": result["2GiB"]["best_gb_s"], "median_gb_s": result["2GiB"]["median_gb_s"]}


def _spec_bytes(spec) -> int:
    tensors = list(spec.tensors) + ([spec.bias] if spec.bias is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors) + sum(_spec_bytes(p) for p in spec.parts)


def linear_bytes(model) -> tuple[int, int, dict]:
    """(decoder linears' bytes, LM head's bytes, kinds) as the decode step reads them."""
    from scaleinfer.layers.linear import Linear

    body = head = 0
    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        method = module.quant_method
        spec = method.decode_spec(module) if hasattr(method, "decode_spec") else None
        if spec is not None:
            n, kind = _spec_bytes(spec), spec.kind
        else:  # a Python-path method: everything the module holds
            n = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
            kind = type(method).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
        if name.rpartition(".")[2] == "lm_head":
            head += n
        else:
            body += n
    return body, head, kinds


def kv_bytes_per_position(cfg, element_size: int) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * element_size


def run_scaleinfer(model: str, mode: str, threads: int, tokens: int, rounds: int) -> dict:
    from scaleinfer import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, threads=threads, kv_cache_memory="256MiB", max_model_len=1024, quantization=mode,
              enable_prefix_caching=False)
    load_s = time.perf_counter() - start
    cfg = llm.engine.model_config
    body, head, kinds = linear_bytes(llm.engine.model)
    ids = _prompt(cfg.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    rates = []
    for _ in range(rounds):
        first = None
        for out in llm.stream(ids, params):
            if first is None:
                first = time.perf_counter()
        rates.append((tokens - 1) / (time.perf_counter() - first))
    kv = kv_bytes_per_position(cfg, 4) * (PROMPT_TOKENS + tokens // 2)
    return {"engine": "scaleinfer", "mode": mode, "load_s": load_s, "linear_bytes": body, "lm_head_bytes": head,
            "kv_bytes": kv, "bytes_per_token": body + head + kv, "tok_s": statistics.median(rates),
            "tok_s_rounds": rates, "linear_kinds": kinds}


def gguf_bytes_per_token(path: str) -> tuple[int, int, object]:
    """(bytes of the GGUF tensors a decode token reads in full, LM head bytes, config): every tensor but
    the embedding table (one row is read), unless the embedding is also the LM head."""
    from scaleinfer.weights import gguf
    from scaleinfer.weights.gguf_file import GGUFFile

    gf = GGUFFile.open(path)
    cfg = gguf.read_model_config(gf)
    head_name = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    total = sum(t.num_bytes for t in gf.tensors if t.name != "token_embd.weight" or cfg.tie_word_embeddings)
    head = next(t.num_bytes for t in gf.tensors if t.name == head_name)
    return total, head, cfg


_LLAMACPP = r"""
import json, statistics, sys, time
from llama_cpp import Llama
job = json.loads(sys.argv[1])
llm = Llama(job["gguf"], n_ctx=1024, n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
rates = []
for r in range(job["rounds"] + 1):
    llm.reset()
    llm.eval(job["ids"])
    tok = 1000
    t = time.perf_counter()
    for _ in range(job["tokens"] - 1):
        llm.eval([tok])
    if r:  # the first round warms up
        rates.append((job["tokens"] - 1) / (time.perf_counter() - t))
print(json.dumps({"tok_s": statistics.median(rates), "tok_s_rounds": rates,
                  "llama_cpp_python": __import__("llama_cpp").__version__}))
"""


def run_llamacpp(python: str, model: str, threads: int, tokens: int, rounds: int) -> dict:
    from scaleinfer import catalog

    path = catalog.resolve(model)
    weights, head, cfg = gguf_bytes_per_token(path)
    job = {"gguf": path, "threads": threads, "ids": _prompt(cfg.vocab_size), "tokens": tokens, "rounds": rounds}
    proc = subprocess.run([python, "-c", _LLAMACPP, json.dumps(job)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed: {proc.stderr[-1000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    kv = kv_bytes_per_position(cfg, 2) * (PROMPT_TOKENS + tokens // 2)  # llama.cpp's KV cache is f16
    return {"engine": "llama.cpp", "mode": "gguf", "linear_bytes": weights - head, "lm_head_bytes": head,
            "kv_bytes": kv, "bytes_per_token": weights + kv, **res}


def _child(args) -> None:
    if args.case == "limit":
        print(json.dumps(streaming_limit(args.threads)))
    elif args.case == "llamacpp":
        print(json.dumps(run_llamacpp(args.llamacpp_python, args.model, args.threads, args.tokens, args.rounds)))
    else:
        print(json.dumps(run_scaleinfer(args.model, args.case, args.threads, args.tokens, args.rounds)))


def _run_child(case: str, model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--model", model, "--threads", str(args.threads),
           "--tokens", str(args.tokens), "--rounds", str(args.rounds),
           "--llamacpp-python", args.llamacpp_python or ""]
    print(f"running {model} {case} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(limit: dict, rows: list[dict]) -> str:
    small = limit.get("512MiB", limit)["best_gb_s"]
    lines = [f"streaming limit ({limit['threads']} threads, torch.sum over 2 GiB): {limit['best_gb_s']:.2f} GB/s "
             f"(median {limit['median_gb_s']:.2f}; over 512 MiB: {small:.2f})", "",
             f"{'model':30} {'engine/mode':18} {'MB/token':>9} {'(head, KV)':>15} {'tok/s':>7} {'GB/s':>6} "
             f"{'% limit':>8}"]
    for r in rows:
        label = f"{r['engine']} {r['mode']}"
        if "error" in r:
            lines.append(f"{r['model']:30} {label:18} error: {r['error'][:80]}")
            continue
        gb_s = r["bytes_per_token"] * r["tok_s"] / 1e9
        parts = f"({r['lm_head_bytes'] / 1e6:.0f}, {r['kv_bytes'] / 1e6:.1f})"
        lines.append(f"{r['model']:30} {label:18} {r['bytes_per_token'] / 1e6:9.1f} {parts:>15} "
                     f"{r['tok_s']:7.2f} {gb_s:6.2f} {100 * gb_s / limit['best_gb_s']:7.0f}%")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default="none,w4a8", help="scaleinfer --quantization modes (none: the default)")
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llamacpp-python", default=None)
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(argparse.Namespace(**{**vars(args), "case": args.child}))
        return 0
    limit = {**_run_child("limit", "", args), "threads": args.threads}
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"decode-bandwidth-{time.strftime('%Y%m%d-%H%M%S')}.json")
    cases = [(model, "scaleinfer", mode) for model in args.models.split(",") for mode in args.modes.split(",")]
    if args.llamacpp_python:
        cases += [(model, "llama.cpp", "gguf") for model in args.models.split(",")]
    rows = []
    for model, engine, mode in cases:  # each row is written as soon as it is measured
        row = {"model": model, "engine": engine, "mode": mode,
               **_run_child("llamacpp" if engine == "llama.cpp" else mode, model, args)}
        if "error" not in row:
            row["gb_s"] = row["bytes_per_token"] * row["tok_s"] / 1e9
            row["percent_of_limit"] = 100 * row["gb_s"] / limit["best_gb_s"]
        rows.append(row)
        print(format_table(limit, [row]).splitlines()[-1], file=sys.stderr, flush=True)
        with open(path, "w") as f:
            json.dump({"threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
                       "prompt_tokens": PROMPT_TOKENS, "load_average": os.getloadavg(), "streaming_limit": limit,
                       "results": rows}, f, indent=1)
    print(format_table(limit, rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
