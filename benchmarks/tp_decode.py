"""Batch-1 decode: one process x T threads against tensor parallel TP ranks x T/TP threads, same cores.

    python benchmarks/tp_decode.py --model qwen2.5-coder-1.5b-instruct --threads 2 --tp 2 --rounds 5 \\
        --decode-tokens 48 [--communicator shm|gloo] [--quantization auto]

Both engines live in this process (the TP engine's driver here, its workers spawned); torch's thread count
is set before each one's turn. Each round prefills a short prompt, then times `--decode-tokens` greedy
steps (engine.step) of each engine in turn (the order rotating each round; the one-process engine also
on a single thread): the shared machine drifts,
so speeds are medians over rounds and the ratio is the median of same-round ratios. Under TP the time
rank 0 spends inside collectives per step (all-reduces of the decode program, logits gather) and in the
step broadcast is reported too. Writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time

import torch

from scaleinfer import LLM, SamplingParams
from scaleinfer.distributed.executor import MultiprocExecutor

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring and tests."


def decode_round(llm: LLM, threads: int, tokens: int) -> dict:
    """One request: prefill (not timed), then `tokens` decode steps; tok/s and communication per step."""
    torch.set_num_threads(threads)
    engine = llm.engine
    engine.add_request(engine.new_request_id(), PROMPT, SamplingParams(max_tokens=tokens + 1, temperature=0,
                                                                     ignore_eos=True))
    engine.step()   # prefill + first token
    executor = engine.executor
    comm = executor.comm if isinstance(executor, MultiprocExecutor) else None
    if comm is not None:
        comm.reset_stats()
        sent = executor.broadcast_seconds
    start = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - start
    out = {"tok_s": steps / elapsed, "ms_per_step": 1e3 * elapsed / steps}
    if comm is not None:
        seconds, calls = comm.stats()
        out["comm_ms_per_step"] = 1e3 * seconds / steps
        out["collectives_per_step"] = calls / steps
        out["broadcast_ms_per_step"] = 1e3 * (executor.broadcast_seconds - sent) / steps
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--threads", type=int, default=2, help="threads in total (each TP rank gets threads / tp)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--communicator", default="auto")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=48)
    args = p.parse_args()
    common = dict(quantization=args.quantization, kv_cache_memory="64MiB", max_model_len=512)
    single = LLM(args.model, threads=args.threads, **common)
    tp = LLM(args.model, threads=args.threads // args.tp, tensor_parallel_size=args.tp,
             distributed_communicator=args.communicator, **common)
    engines = {"one": (single, args.threads), f"tp{args.tp}": (tp, args.threads // args.tp),
               "one_1thread": (single, 1)}   # one process on one core: what a rank's share of the work costs
    for llm, threads in engines.values():   # warm-up: decode programs built, pages touched
        decode_round(llm, threads, 8)
    rounds = []
    for r in range(args.rounds):
        order = list(engines)[r % len(engines):] + list(engines)[:r % len(engines)]
        rounds.append({name: decode_round(*engines[name], args.decode_tokens) for name in order})
        print(json.dumps(rounds[-1]), flush=True)
    name_tp = f"tp{args.tp}"
    summary = {
        "one_tok_s": statistics.median(r["one"]["tok_s"] for r in rounds),
        f"{name_tp}_tok_s": statistics.median(r[name_tp]["tok_s"] for r in rounds),
        f"{name_tp}_over_one": statistics.median(r[name_tp]["tok_s"] / r["one"]["tok_s"] for r in rounds),
        "one_1thread_tok_s": statistics.median(r["one_1thread"]["tok_s"] for r in rounds),
        f"{name_tp}_over_one_1thread": statistics.median(r[name_tp]["tok_s"] / r["one_1thread"]["tok_s"]
                                                         for r in rounds),
        "comm_ms_per_step": statistics.median(r[name_tp]["comm_ms_per_step"] for r in rounds),
        "broadcast_ms_per_step": statistics.median(r[name_tp]["broadcast_ms_per_step"] for r in rounds),
        "collectives_per_step": rounds[-1][name_tp]["collectives_per_step"],
        "communicator": tp.engine.executor.comm.name,
    }
    print(json.dumps(summary, indent=1))
    tp.engine.shutdown()
    out = {"args": vars(args), "load_avg": os.getloadavg(), "rounds": rounds, "summary": summary,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"tp_decode_{args.model}_{args.quantization}_{summary['communicator']}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
