"""One process x N threads vs pipeline parallel (PP ranks x 1 thread): batch-1 decode, a 512-token prefill and
a mixed load, with each stage's compute / wait time on the mixed load (the bubble). Not a test.

    python benchmarks/pipeline_parallel.py --model qwen2.5-coder-1.5b-instruct --pp 2 [--micro 1 2] \
        [--partitions default 16,12 17,11]

Every configuration runs in this one process, one after another (ratios within one run only: the machine
may be shared). Prints one JSON line per configuration.
"""
from __future__ import annotations

import argparse
import json
import random
import time

from scaleinfer import LLM, SamplingParams
from scaleinfer.config import ParallelConfig

WORDS = ("alpha beta gamma delta function return value list index loop while print import class self "
         "data model token cache layer stage pipeline tensor batch").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _decode(llm: LLM) -> float:
    out = llm.generate("def quicksort(arr):", SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    m = out.metrics
    return (len(out.outputs[0].token_ids) - 1) / (m.finish_time - m.first_token_time)


def _prefill(llm: LLM, rng: random.Random) -> float:
    ids = llm.tokenizer.encode(_text(rng, 700))[:512]
    start = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0))
    return 512 / (time.perf_counter() - start)


def _mixed(llm: LLM, rng: random.Random, n: int, max_out: int) -> dict:
    prompts = [_text(rng, rng.randint(40, 160)) for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(max_out // 3, max_out), temperature=0, ignore_eos=True)
              for _ in range(n)]
    executor = llm.engine.executor
    if hasattr(executor, "stage_stats"):
        executor.stage_stats()   # reset
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    result = {"wall_s": round(wall, 2), "output_tok_s": round(gen / wall, 2), "total_tok_s": round((gen + prompt) / wall, 2),
              "steps": llm.engine.stats.num_steps}
    if hasattr(executor, "stage_stats"):
        result["stages"] = [{"rank": s["rank"], "compute_s": round(s["compute_s"], 2), "wait_s": round(s["wait_s"], 2),
                             "utilization": round(s["compute_s"] / wall, 3)} for s in executor.stage_stats()]
    return result


def run(model: str, threads: int, pp: int, micro: int | None, requests: int, concurrent: int, max_out: int,
        partition: tuple[int, ...] | None = None) -> dict:
    parallel = ParallelConfig(pipeline_parallel_size=pp, pipeline_micro_batches=micro, distributed_timeout=600,
                              pipeline_layer_partition=partition)
    start = time.perf_counter()
    llm = LLM(model, threads=threads, kv_cache_memory="1GiB", max_model_len=1024, max_num_seqs=concurrent,
              parallel=parallel)
    load = time.perf_counter() - start
    try:
        llm.generate("warm up", SamplingParams(max_tokens=4, temperature=0))
        rng = random.Random(0)
        return {"pp": pp, "threads_per_rank": threads, "micro_batches": micro or pp, "load_s": round(load, 1),
                "partition": "default" if partition is None else ",".join(map(str, partition)),
                "decode_tok_s": round(_decode(llm), 2), "prefill512_tok_s": round(_prefill(llm, rng), 1),
                "mixed": _mixed(llm, rng, requests, max_out)}
    finally:
        llm.engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--micro", type=int, nargs="*", default=[2], help="micro-batch counts to run under PP")
    ap.add_argument("--partitions", nargs="*", default=["default"],
                    help="layer partitions to run under PP: default (the engine's own split) or counts, e.g. 16,12")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=96, help="mixed load: outputs of max/3 .. max tokens")
    args = ap.parse_args()
    print(json.dumps(run(args.model, args.pp, 1, None, args.requests, args.concurrent, args.max_output)), flush=True)
    for partition in args.partitions:
        split = None if partition == "default" else tuple(int(n) for n in partition.split(","))
        for micro in args.micro:
            print(json.dumps(run(args.model, 1, args.pp, micro, args.requests, args.concurrent, args.max_output,
                                 split)), flush=True)


if __name__ == "__main__":
    main()
