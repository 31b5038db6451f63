"""`scaleinfer bench long-context`: prefill cost and KV memory of attention patterns vs sequence length,
and the StreamingLLM quality experiment (perplexity over one long stream).

Speed/memory sweep: for every (pattern, length) a fresh worker process loads the model with
`--attention-pattern`, a KV budget sized to what the pattern needs (dense: the whole sequence; a
bounded pattern: sinks + window + one prefill chunk), and computes one prompt of `length` tokens
(max_tokens=1, so the time is the prefill). It reports prefill seconds, the peak number of live KV
blocks (KV MiB) and the process's peak RSS. Expected shape: dense prefill grows quadratically,
window / sparse patterns linearly; window and sinks KV stays flat.

Quality: one stream of `--stream-tokens` tokens of a text file is scored by a single pass through
the engine's paged model for (a) dense attention (every earlier token, within the model's context),
(b) a window only, (c) sinks + window, (d) any other pattern given. StreamingLLM (Xiao et al. 2023)
found that (b) breaks down once the first tokens leave the window and (c) stays close to (a).

Results: a table on stdout, JSON and a PNG plot (when matplotlib is installed) in --output-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

from scaleinfer.attention.patterns import parse_pattern

DEFAULT_PATTERNS = ("causal;window=512;sinks=4,window=508,positions=cache;window=256,global=0:256;"
                    "block=64,local=4,stride=8")
DEFAULT_LENGTHS = "1000,2000,4000,8000,16000,32000"
FALLBACK_TEXT = ("The keepers of the northern light kept a log of every storm, every ship and every sailor who "
                 "came ashore; the log grew one line at a time for two hundred years. ")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--patterns", default=DEFAULT_PATTERNS,
                   help="';'-separated attention patterns (see --attention-pattern); causal = dense")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated prompt lengths in tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (max_num_batched_tokens)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="skip the longer lengths of a pattern once one run took longer than this")
    p.add_argument("--text", default=os.path.join("..", "shared", "data", "shakespeare-en.txt"),
                   help="text for prompts and the quality stream (a built-in text if missing)")
    p.add_argument("--stream-tokens", type=int, default=8000, help="length of the quality stream (0: skip)")
    p.add_argument("--stream-patterns", default="causal;window=256;sinks=4,window=252;sinks=4,window=252,positions=cache",
                   help="';'-separated patterns of the quality experiment")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--no-past-positions", dest="past_positions", action="store_false",
                   help="do not time prompts longer than the model's trained positions (by default they run, "
                        "as a cost measurement)")
    p.add_argument("--merge", action="append", metavar="JSON",
                   help="add the sweep rows of an earlier run's JSON for points this run did not measure "
                        "(the table, JSON and plot cover both); repeatable")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return FALLBACK_TEXT * 2000


def _token_stream(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _kv_budget_tokens(pattern_text: str, length: int, chunk: int, block_size: int) -> int:
    """KV tokens to budget so that the cache allocation (which the process's RSS counts) follows what
    the pattern keeps: the most live keys at any chunk boundary, plus one chunk and block rounding."""
    pattern = parse_pattern(pattern_text)
    if pattern.kind == "causal":
        return length + block_size
    def live(q: int) -> int:
        return sum(hi - lo for lo, hi in pattern.live_ranges(q))

    ranges = len(pattern.live_ranges(length))
    peak = max(live(q) for q in [*range(0, length + chunk, chunk), length + 1])
    return min(length + block_size, peak + chunk + (ranges + 2) * block_size)


# ---- worker: one (pattern, length) in a fresh process ---------------------------------------------
def _worker(spec: dict) -> dict:
    from scaleinfer import LLM, SamplingParams

    length, chunk, block_size = spec["length"], spec["chunk"], 16
    tokens_needed = _kv_budget_tokens(spec["pattern"], length, chunk, block_size)
    from scaleinfer.config import CacheConfig
    from scaleinfer.engine.loading import DTYPES
    from scaleinfer.kv_cache.cache_tensors import bytes_per_token
    from scaleinfer.engine.engine import position_limit
    from scaleinfer.weights.loader import open_checkpoint

    cfg = open_checkpoint(spec["model"]).config
    per_token = bytes_per_token(cfg, DTYPES["float32"], CacheConfig().kv_cache_dtype)
    llm = LLM(spec["model"], attention_pattern=None if spec["pattern"] == "causal" else spec["pattern"],
              threads=spec["threads"], max_num_batched_tokens=chunk, max_model_len=length + 8,
              kv_cache_memory=max(tokens_needed * per_token, per_token * block_size), block_size=block_size,
              enable_prefix_caching=False)
    engine = llm.engine
    prompt = _token_stream(llm.tokenizer, _read_text(spec["text"]), length)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    bm, execute = engine.scheduler.block_manager, engine.runner.execute
    peak_blocks = 0

    def execute_and_count(sched):  # blocks held while the step runs (the chunk's new blocks included)
        nonlocal peak_blocks
        peak_blocks = max(peak_blocks, bm.num_blocks - bm.num_free_blocks)
        return execute(sched)

    engine.runner.execute = execute_and_count
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    seconds = time.perf_counter() - start
    return {"pattern": spec["pattern"], "length": length, "prefill_s": seconds, "prefill_tok_s": length / seconds,
            "peak_kv_blocks": peak_blocks, "kv_mib": peak_blocks * block_size * per_token / 2**20,
            "kv_budget_mib": engine.num_kv_blocks * block_size * per_token / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mib": rss_before / 1024, "threads": spec["threads"],
            "past_positions": length > position_limit(cfg), "model_positions": position_limit(cfg)}


def _run_worker(spec: dict, timeout: float) -> dict | None:
    from scaleinfer.config import ALLOW_LONG_ENV

    cmd = [sys.executable, "-m", "scaleinfer.bench.long_context", "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("past_positions"):  # a cost measurement: the logits past the model's positions are unused
        env[ALLOW_LONG_ENV] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode == 3:  # the engine refused the request (e.g. past the model's positions)
        return proc.stdout.strip().splitlines()[-1]
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- quality: perplexity over one long stream --------------------------------------------------
def stream_perplexity(model: str, text: str, n: int, patterns: list[str], threads: int | None,
                      segment: int = 1024, kv_cache_memory: str = "2GiB") -> list[dict]:
    """Perplexity of one n-token stream under each pattern, overall and per `segment` tokens, scored
    chunk by chunk through the paged cache (LLMEngine.score_stream: the KV policy frees blocks as the
    stream goes). A pattern that cannot run n tokens (dense past the model's positions) is reported
    with its error."""
    from scaleinfer import LLM
    from scaleinfer.errors import ScaleInferError

    out = []
    for spec in patterns:
        llm = LLM(model, attention_pattern=None if spec == "causal" else spec, threads=threads,
                  max_model_len=n + 8, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False)
        engine = llm.engine
        ids = _token_stream(llm.tokenizer, text, n)
        tok = llm.tokenizer
        bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
        bm, held = engine.scheduler.block_manager, 0
        free_dead = bm.free_dead_blocks

        def count_held(request, live):  # blocks held after each chunk, before the policy frees some
            nonlocal held
            held = max(held, bm.num_blocks - bm.num_free_blocks)
            return free_dead(request, live)

        bm.free_dead_blocks = count_held
        start = time.perf_counter()
        try:
            nll = -engine.score_stream(bos + ids)[len(bos):]
        except ScaleInferError as exc:
            out.append({"pattern": spec, "tokens": n, "error": str(exc)})
            print(f"  {spec:<36} cannot run {n} tokens: {exc}", flush=True)
            continue
        seconds = time.perf_counter() - start
        if engine.scheduler.kv_patterns is None:
            held = -(-len(bos + ids) // engine.config.cache.block_size)
        segs = [math.exp(float(nll[i:i + segment].mean())) for i in range(0, len(nll), segment)]
        out.append({"pattern": spec, "tokens": n, "perplexity": math.exp(float(nll.mean())),
                    "segment": segment, "segment_perplexity": segs, "seconds": seconds,
                    "peak_kv_blocks": held, "kv_mib": held * engine.config.cache.block_size
                    * engine.kv_bytes_per_token / 2**20})
        print(f"  {spec:<36} ppl {out[-1]['perplexity']:9.3f}  KV {out[-1]['kv_mib']:7.1f} MiB  per {segment}: "
              + " ".join(f"{s:.1f}" for s in segs), flush=True)
        del llm, engine
    return out


# ---- driver ----------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    patterns = [p.strip() for p in args.patterns.split(";") if p.strip()]
    for p in patterns:
        parse_pattern(p)  # bad input fails before any work
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    rows = []
    print(f"{'pattern':<28}{'tokens':>8}{'prefill s':>11}{'tok/s':>9}{'KV MiB':>9}{'peak RSS MiB':>14}", flush=True)
    for pattern in patterns:
        for length in lengths:
            spec = {"model": args.model, "pattern": pattern, "length": length, "chunk": args.chunk,
                    "threads": args.threads, "text": args.text, "past_positions": args.past_positions}
            row = _run_worker(spec, timeout=args.max_seconds * 4 + 120)
            if isinstance(row, str):
                print(f"{pattern:<28}{length:>8}   not run: {row}", flush=True)
                break
            if row is None:
                print(f"{pattern:<28}{length:>8}   timed out; longer lengths skipped", flush=True)
                break
            rows.append(row)
            print(f"{pattern:<28}{length:>8}{row['prefill_s']:>11.2f}{row['prefill_tok_s']:>9.0f}"
                  f"{row['kv_mib']:>9.1f}{row['peak_rss_mib']:>14.0f}{'  *' if row['past_positions'] else ''}",
                  flush=True)
            if row["prefill_s"] > args.max_seconds:
                print(f"{'':<28}(took > {args.max_seconds:.0f} s: longer lengths skipped)", flush=True)
                break

    if any(r.get("past_positions") for r in rows):
        print("* past the model's trained positions: a cost measurement only (--no-past-positions to skip)")
    merged_quality = []
    for earlier in args.merge or []:  # rows of (pattern, length) points this run did not measure
        with open(earlier) as f:
            record = json.load(f)
        measured = {(r["pattern"], r["length"]) for r in rows}
        rows += [r for r in record["sweep"] if (r["pattern"], r["length"]) not in measured]
        merged_quality = merged_quality or record.get("quality", [])
    order = {p: i for i, p in enumerate(dict.fromkeys([*patterns, *(r["pattern"] for r in rows)]))}
    rows.sort(key=lambda r: (order[r["pattern"]], r["length"]))

    quality = []
    if args.stream_tokens:
        print(f"\nquality: perplexity of one {args.stream_tokens}-token stream of {args.text}", flush=True)
        stream_patterns = [p.strip() for p in args.stream_patterns.split(";") if p.strip()]
        quality = stream_perplexity(args.model, _read_text(args.text), args.stream_tokens, stream_patterns,
                                    args.threads)
    quality = quality or merged_quality  # a sweep-only run keeps the merged run's stream experiment

    os.makedirs(args.output_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.output_dir, f"long-context-{stamp}.json")
    record = {"model": args.model, "threads": args.threads, "chunk": args.chunk, "text": args.text,
              "merged_from": args.merge or [], "sweep": rows, "quality": quality}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {path}")
    png = replot(path) if rows else None
    if png:
        print(f"wrote {png}")
    return 0


def _plot(rows: list[dict], path: str, positions: int | None = None) -> str | None:
    """Prefill time, KV held and peak RSS against length, one line per pattern (log-log); a dashed
    line marks the model's trained positions when some points lie past them."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return None
    panels = (("prefill_s", "prefill time", "seconds"), ("kv_mib", "KV cache held", "MiB"),
              ("peak_rss_mib", "peak RSS", "MiB"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        rs = [r for r in rows if r["pattern"] == pattern]
        for ax, (key, _, _) in zip(axes, panels):
            ax.plot([r["length"] for r in rs], [r[key] for r in rs], marker="o", label=pattern)
    for ax, (_, title, unit) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if positions and any(r.get("past_positions") for r in rows):
            ax.axvline(positions, color="grey", linestyle="--", linewidth=1)
    if positions and any(r.get("past_positions") for r in rows):
        axes[0].text(positions * 1.05, axes[0].get_ylim()[0] * 1.2, f"model positions ({positions})", fontsize=7,
                     color="grey")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot(json_path: str) -> str | None:
    """Redraw the PNG of a results JSON (e.g. after merging runs by hand)."""
    with open(json_path) as f:
        record = json.load(f)
    positions = next((r["model_positions"] for r in record["sweep"] if "model_positions" in r), None)
    return _plot(record["sweep"], json_path.removesuffix(".json") + ".png", positions)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args()
    if ns.worker:
        from scaleinfer.errors import ScaleInferError

        try:
            print(json.dumps(_worker(json.loads(ns.worker))))
        except ScaleInferError as exc:
            print(exc)
            sys.exit(3)
    else:
        sys.exit(main(ns))
