"""`scaleinfer bench embed`: sentences/s of encoder models on mixed-length sentences (built from data/*.txt),
scaleinfer vs sentence-transformers (HF) vs onnxruntime (our ONNX export), same threads, interleaved
chunk by chunk (a shared machine's load changes hit every engine alike);
a table on stdout and JSON under benchmarks/results. Also the agreement (min cosine) with
sentence-transformers, so a fast wrong answer cannot pass for a fast one."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import re
import sys
import time

import torch

logger = logging.getLogger(__name__)

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "data")
MODELS = ("all-minilm-l6-v2", "all-mpnet-base-v2")
ENGINES = ("scaleinfer", "scaleinfer-bf16", "sentence-transformers", "onnxruntime")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated encoder models (default: %(default)s)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    p.add_argument("--num-sentences", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: torch's default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the `scaleinfer` row's compute dtype (the scaleinfer-bf16 row is always bfloat16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="scaleinfer's batch token budget")
    p.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' batch size (its default)")
    p.add_argument("--chunk", type=int, default=500,
                   help="sentences per interleaved round: every engine embeds a chunk before the next chunk")
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--output-dir", default="benchmarks/results")


def sentences(data_dir: str, n: int, seed: int = 0) -> list[str]:
    """n sentences of mixed length and language: English (shakespeare-en.txt) and Chinese (hongloumeng-zh.txt)
    sentences, 1 to 6 joined, some English + Chinese mixes; deterministic."""
    en = _split(open(os.path.join(data_dir, "shakespeare-en.txt"), encoding="utf-8").read(), r"(?<=[.!?;:])\s+")
    zh = _split(open(os.path.join(data_dir, "hongloumeng-zh.txt"), encoding="utf-8").read(), r"(?<=[。！？；])")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        k = rng.choice([1, 1, 1, 2, 2, 3, 4, 6])
        if r < 0.6:
            pick = [rng.choice(en) for _ in range(k)]
        elif r < 0.9:
            pick = [rng.choice(zh) for _ in range(k)]
        else:
            pick = [rng.choice(en), rng.choice(zh)]
        out.append(" ".join(pick)[:1000])
    return out


def _split(text: str, pattern: str) -> list[str]:
    parts = (re.sub(r"\s+", " ", s).strip() for s in re.split(pattern, text))
    return [s for s in parts if len(s) >= 4]


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_model(model: str, texts: list[str], args, engines: list[str]) -> dict:
    """Every engine embeds the same chunks of `texts` in interleaved rounds (chunk 1 by every engine, then
    chunk 2 ...), so a change in the machine's load hits all of them alike; per engine the summed time."""
    from scaleinfer import catalog
    from scaleinfer.engine.encoder_engine import EncoderEngine

    path = catalog.resolve(model)
    ours = EncoderEngine(path, name=model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=1024)
    runs = {}
    if "scaleinfer" in engines:
        runs["scaleinfer"] = lambda chunk: ours.embed_tensor(chunk, truncate_prompt_tokens=-1)[0]
    if "scaleinfer-bf16" in engines:   # AMX / AVX512-BF16 matmuls: faster, ~1e-4 from float32 (see min cosine)
        bf16 = EncoderEngine(path, name=model, dtype="bfloat16", max_num_batched_tokens=args.max_num_batched_tokens,
                             max_num_seqs=1024)
        runs["scaleinfer-bf16"] = lambda chunk: bf16.embed_tensor(chunk, truncate_prompt_tokens=-1)[0]
    if "sentence-transformers" in engines:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
        runs["sentence-transformers"] = lambda chunk: st.encode(chunk, batch_size=args.st_batch_size,
                                                                convert_to_tensor=True).float()
    if "onnxruntime" in engines:
        from scaleinfer.runner.onnx_runner import OnnxEncoder

        fp32 = ours if args.dtype == "float32" else EncoderEngine(path, name=model, max_num_batched_tokens=2048)
        runner = OnnxEncoder.for_engine(fp32)   # exported once into the cache
        ort = EncoderEngine.__new__(EncoderEngine)
        ort.__dict__.update(fp32.__dict__)
        ort.runner, ort.max_num_batched_tokens = runner, 2048   # padded batches: a smaller budget
        runs["onnxruntime"] = lambda chunk: ort.embed_tensor(chunk, truncate_prompt_tokens=-1)[0]
    for run in runs.values():
        run(texts[:64])                  # warm-up (allocator, oneDNN primitives, onnxruntime session)
    rows = {name: 0.0 for name in runs}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
    for i in range(0, len(texts), args.chunk):
        for name, run in runs.items():
            secs, emb = _time(lambda: run(texts[i:i + args.chunk]))
            rows[name] += secs
            parts[name].append(emb)
        done = min(i + args.chunk, len(texts))
        print(f"  {done}/{len(texts)} sentences: " + ", ".join(f"{n} {done / s:.1f}/s" for n, s in rows.items()),
              file=sys.stderr, flush=True)
    results = {name: torch.cat(p) for name, p in parts.items()}
    ref = results.get("sentence-transformers")
    report = {}
    for name, secs in rows.items():
        entry = {"seconds": round(secs, 3), "sentences_per_s": round(len(texts) / secs, 1)}
        if ref is not None:
            entry["min_cosine_vs_st"] = round(float(torch.nn.functional.cosine_similarity(
                results[name], ref, dim=-1).min()), 6)
        report[name] = entry
    return report


def main(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    texts = sentences(args.data_dir, args.num_sentences)
    load = os.getloadavg()
    result = {"bench": "embed", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "threads": threads, "num_sentences": len(texts), "dtype": args.dtype,
              "max_num_batched_tokens": args.max_num_batched_tokens, "st_batch_size": args.st_batch_size,
              "chunk": args.chunk,
              "load_before": [round(x, 2) for x in load], "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "models": {}}
    print(f"{len(texts)} sentences, {threads} threads, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        report = run_model(model, texts, args, engines)
        result["models"][model] = report
        _print(model, report)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.output_dir, f"embed-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


def _print(model: str, report: dict) -> None:
    st = report.get("sentence-transformers", {}).get("sentences_per_s")
    print(f"\n{model}")
    print(f"  {'engine':<24}{'sentences/s':>12}{'seconds':>10}{'vs ST':>8}{'min cos vs ST':>15}")
    for name, r in report.items():
        ratio = f"{r['sentences_per_s'] / st:.2f}x" if st else "-"
        cos = r.get("min_cosine_vs_st", "-")
        print(f"  {name:<24}{r['sentences_per_s']:>12.1f}{r['seconds']:>10.2f}{ratio:>8}{cos!s:>15}")
