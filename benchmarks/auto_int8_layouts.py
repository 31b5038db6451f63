"""Which 8-bit layout should `--quantization auto` give a GGUF's 5-8-bit tensors (Q5_*, Q6_K, Q8_0)? A/B in one
process, rounds alternating, so the machine's minute-to-minute drift hits both alike: Qwen2.5-Coder-1.5B
Q4_K_M (its 14 Q6_K ffn_down and 14 Q6_K attn_v run at 8 bits), batch-1 greedy decode, with those linears as

  block32     int8 per block of 32 x int8 activations (W8A8Block32: csrc/int8_a8.cpp, what auto gives now)
  perchannel  int8 per output channel, fp32 activations below 16 rows (W8A8: csrc/lowbit_linear.cpp's
              int8_linear, what auto gave before), quantized from the same block32 weights

and a 512-token prefill (a fresh random prompt each time, so the prefix cache never answers). Prints tok/s
per round and the ratios; writes JSON under benchmarks/results/.

    .venv/bin/python benchmarks/auto_int8_layouts.py --threads 2 --rounds 4
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--output-dir", default="benchmarks/results")
    args = ap.parse_args()

    from scaleinfer import LLM, SamplingParams
    from scaleinfer.layers.linear import Linear
    from scaleinfer.quantization.int8 import W8A8, W8A8Block32

    llm = LLM(args.model, threads=args.threads, kv_cache_memory="256MiB", max_model_len=1024)
    layouts: list[tuple[Linear, tuple, tuple]] = []
    for name, mod in llm.engine.runner.model.named_modules():
        if isinstance(mod, Linear) and isinstance(mod.quant_method, W8A8Block32) and not name.endswith("lm_head"):
            dense = Linear(mod.in_features, mod.out_features, bias=False)
            dense.weight.data.copy_(mod.quant_method.dequantize(mod))
            per_channel = W8A8()
            per_channel.process_weights_after_loading(dense)
            layouts.append((mod, (mod.quant_method, mod.qweight, mod.weight_scale),
                            (per_channel, dense.qweight, dense.weight_scale)))
    if not layouts:
        raise SystemExit(f"{args.model} has no 8-bit decoder linears under auto: nothing to compare")

    def install(which: str) -> None:
        for mod, block32, per_channel in layouts:
            mod.quant_method, mod.qweight, mod.weight_scale = block32 if which == "block32" else per_channel
        llm.engine.runner._plan_built = False   # the decode program is rebuilt for the swapped methods

    prompt = list(range(1000, 1016))
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    rng = random.Random(0)
    speeds: dict[str, list[float]] = {"perchannel": [], "block32": []}
    prefill: dict[str, list[float]] = {"perchannel": [], "block32": []}
    for rnd in range(args.rounds):
        for which in speeds:
            install(which)
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))   # warm-up
            m = llm.generate([prompt], params)[0].metrics
            speeds[which].append((args.tokens - 1) / (m.finish_time - m.first_token_time))
            long = [rng.randrange(1000, 100000) for _ in range(512)]
            start = time.perf_counter()
            llm.generate([long], SamplingParams(temperature=0, max_tokens=1))
            prefill[which].append(len(long) / (time.perf_counter() - start))
            print(f"round {rnd} {which:<11} decode {speeds[which][-1]:6.2f} tok/s, prefill {prefill[which][-1]:6.1f} "
                  f"tok/s", flush=True)
    ratios = [b / a for a, b in zip(speeds["perchannel"], speeds["block32"])]
    prefill_ratios = [b / a for a, b in zip(prefill["perchannel"], prefill["block32"])]
    print(f"{len(layouts)} linears swapped; median decode tok/s: block32 {statistics.median(speeds['block32']):.2f}, "
          f"perchannel {statistics.median(speeds['perchannel']):.2f}; per-round block32/perchannel: decode "
          + ", ".join(f"{r:.2f}" for r in ratios) + "; prefill " + ", ".join(f"{r:.2f}" for r in prefill_ratios))
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.output_dir, f"auto-int8-layouts-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"model": args.model, "threads": args.threads, "tokens": args.tokens, "linears": len(layouts),
                   "tok_s": speeds, "ratios": ratios, "prefill_tok_s": prefill, "prefill_ratios": prefill_ratios, "load_average": os.getloadavg()}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
