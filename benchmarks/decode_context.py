"""Batch-1 decode speed by context length: scaleinfer on each KV cache dtype against llama.cpp, same GGUF.

    python benchmarks/decode_context.py --quantization w4a8 --kv float32,float16,int8 \\
        --contexts 128,2048,4096 --llamacpp-python .venv-llamacpp/bin/python

For each context length C, a prompt of C random (ordinary) token ids is prefilled, then `--decode-tokens`
greedy tokens are generated; the speed is the tokens after the first over their time (the prefill is not
timed). Each engine runs in its own process (scaleinfer: one per KV dtype; llama.cpp through
llama-cpp-python in its own venv, this same file run as `--worker llamacpp`, which imports neither torch
nor scaleinfer). They stay up and the parent asks them for one decode round each in turn (the order
rotating each round), since this shared machine drifts by +-20% within minutes: speeds are medians of the
rounds and ratios medians of same-round ratios (as bench/core.py does). Prints a table and writes JSON
under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time


# ---- workers: one JSON job line in, a ready line out, then one line per `decode C` ----------------------

def _scaleinfer_worker(job: dict) -> None:
    from scaleinfer.llm import LLM
    from scaleinfer.sampling_params import SamplingParams

    longest = max(len(p) for p in job["prompts"].values()) + job["decode_tokens"] + 16
    llm = LLM(job["model"], threads=job["threads"], max_num_seqs=1, max_num_batched_tokens=512,
              kv_cache_memory="1GiB", max_model_len=longest, quantization=job["quantization"],
              kv_cache_dtype=job["kv"], enable_prefix_caching=True)   # later rounds reuse the prompt's KV
    params = SamplingParams(temperature=0, max_tokens=job["decode_tokens"], ignore_eos=True)

    def decode(ids: list[int]) -> tuple[float, list[int]]:
        first = None
        for out in llm.stream(ids, params):
            if first is None:
                first = time.perf_counter()
        return (job["decode_tokens"] - 1) / (time.perf_counter() - first), list(out.outputs[0].token_ids)

    _serve(job, decode, lambda: {   # after the warm-up, which builds the decode program
        "engine": "scaleinfer", "mode": f"{job['quantization']}+kv-{job['kv']}",
        "kv_tokens": llm.engine.kv_capacity_tokens,
        "decode_program": bool(llm.engine.runner.decode_plan is not None
                               and llm.engine.runner.decode_plan.program is not None)})


def _llamacpp_worker(job: dict) -> None:
    import numpy as np
    from llama_cpp import Llama

    longest = max(len(p) for p in job["prompts"].values()) + job["decode_tokens"] + 16
    llm = Llama(job["gguf"], n_ctx=longest, n_threads=job["threads"], n_threads_batch=job["threads"], n_batch=512,
                verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    def decode(ids: list[int]) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(ids)
        tok = next_token()
        out = [tok]
        start = time.perf_counter()
        for _ in range(job["decode_tokens"] - 1):
            llm.eval([tok])
            tok = next_token()
            out.append(tok)
        return (job["decode_tokens"] - 1) / (time.perf_counter() - start), out

    import llama_cpp

    _serve(job, decode, {"engine": "llama.cpp", "mode": "gguf, f16 KV", "llama_cpp_python": llama_cpp.__version__})


def _serve(job: dict, decode, ready) -> None:
    prompts = {int(c): ids for c, ids in job["prompts"].items()}
    for ids in prompts.values():   # warm-up (and the decode program built)
        decode(ids)
    print(json.dumps(ready() if callable(ready) else ready), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd != "decode" or not arg.isdigit() or int(arg) not in prompts:
            print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
            continue
        tok_s, ids = decode(prompts[int(arg)])
        print(json.dumps({"tok_s": tok_s, "ids": ids}), flush=True)


# ---- parent -----------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, name: str, cmd: list[str], job: dict):
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.info = self._read()
        self.rounds: dict[int, list[float]] = {}
        self.ids: dict[int, list[int]] = {}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        while line and not line.lstrip().startswith("{"):
            line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError(f"{self.name} failed:\n{self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def decode(self, context: int) -> None:
        self.proc.stdin.write(f"decode {context}\n")
        self.proc.stdin.flush()
        res = self._read()
        self.rounds.setdefault(context, []).append(res["tok_s"])
        self.ids[context] = res["ids"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def format_table(workers: list[_Worker], contexts: list[int]) -> str:
    ref = next((w for w in workers if w.info["engine"] == "llama.cpp"), None)
    f16 = next((w for w in workers if w.info.get("mode", "").endswith("kv-float16")), None)
    names = [w.info["mode"] if w.info["engine"] == "scaleinfer" else "llama.cpp" for w in workers]
    head = ["context"] + [f"{n} tok/s" for n in names]
    head += [f"{n} / llama.cpp" for w, n in zip(workers, names) if ref and w is not ref]
    if f16:
        head += [f"{n} / kv-float16" for w, n in zip(workers, names) if w.info["engine"] == "scaleinfer" and w is not f16]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in contexts:
        row = [str(c)] + [f"{statistics.median(w.rounds[c]):.1f}" for w in workers]
        row += [f"{_ratio(w.rounds[c], ref.rounds[c]):.2f}x" for w in workers if ref and w is not ref]
        if f16:
            row += [f"{_ratio(w.rounds[c], f16.rounds[c]):.2f}x" for w in workers
                    if w.info["engine"] == "scaleinfer" and w is not f16]
        lines.append("| " + " | ".join(row) + " |")
    rounds = len(workers[0].rounds[contexts[0]])
    lines += ["", f"batch-1 decode after a prompt of `context` tokens; medians of {rounds} interleaved rounds; "
                  "ratios: medians of same-round ratios."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["scaleinfer", "llamacpp"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantization", default="w4a8")
    p.add_argument("--kv", default="float32,float16,int8", help="KV cache dtypes to run, comma-separated")
    p.add_argument("--contexts", default="128,2048,4096", help="prompt lengths, comma-separated")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--llamacpp-python", default=None, help="python of a venv with llama-cpp-python")
    p.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args()
    if a.worker:
        job = json.loads(sys.stdin.readline())
        (_scaleinfer_worker if a.worker == "scaleinfer" else _llamacpp_worker)(job)
        return 0
    return _run(a)


def _run(a) -> int:
    from scaleinfer.weights.loader import open_checkpoint

    contexts = [int(c) for c in a.contexts.split(",")]
    ckpt = open_checkpoint(a.model)
    rng = random.Random(0)
    prompts = {c: [rng.randrange(1000, ckpt.config.vocab_size) for _ in range(c)] for c in contexts}
    job = {"model": a.model, "gguf": ckpt.path, "threads": a.threads, "decode_tokens": a.decode_tokens,
           "prompts": prompts, "quantization": a.quantization}
    me = os.path.abspath(__file__)
    workers: list[_Worker] = []
    try:
        for kv in a.kv.split(","):
            workers.append(_Worker(f"scaleinfer kv {kv}", [sys.executable, me, "--worker", "scaleinfer"],
                                   {**job, "kv": kv}))
        if a.llamacpp_python:
            workers.append(_Worker("llama.cpp", [a.llamacpp_python, me, "--worker", "llamacpp"], job))
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            for c in contexts:
                k = (r + contexts.index(c)) % len(workers)
                for w in workers[k:] + workers[:k]:
                    w.decode(c)
    finally:
        for w in workers:
            w.close()
    table = format_table(workers, contexts)
    print(table)
    os.makedirs(a.output_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(a.output_dir, f"decode-context-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"date": stamp, "model": a.model, "gguf": ckpt.path, "threads": a.threads,
                   "machine": platform.machine(), "cpu_count": os.cpu_count(), "contexts": contexts,
                   "decode_tokens": a.decode_tokens, "rounds": a.rounds, "table": table,
                   "command": " ".join(sys.argv),
                   "results": [{**w.info, "tok_s_rounds": w.rounds, "first_ids": {c: ids[:16] for c, ids in w.ids.items()}}
                               for w in workers]}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
