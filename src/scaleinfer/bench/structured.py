"""`scaleinfer bench structured`: the cost of structured outputs per decoded token.

For each batch size, the same B requests decode the same number of tokens three ways, in interleaved
rounds (medians): free text (ignore_eos), constrained by a JSON schema whose grammar cannot end before
max_tokens (an array of at least 1000 small objects: every token walks keys, values and separators), with
the grammar masks filled on a worker thread while the model runs (the default), and the same with the
masks filled after the forward (`prefetch off`). The decode time per step is timed from the first step
in which every request has its first token to the last step; the overhead is constrained / free - 1.
Also reported: the mean time to fill one step's bitmask for the batch alone (xgrammar).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}}
PROMPT = "List people as JSON objects with a name, an age and tags."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated numbers of concurrent requests")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per request")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--work-only", action="store_true",
                   help="time only the grammar work of decode steps (fill, apply, accept over random logits) "
                        "against the free decode step; no constrained end-to-end runs (fast on a busy machine)")


def main(args) -> int:
    from scaleinfer import LLM, SamplingParams
    from scaleinfer.sampling_params import StructuredOutputsParams

    llm = LLM(args.model, threads=args.threads, max_model_len=512, kv_cache_memory="256MiB",
              max_num_seqs=max(int(b) for b in args.batch_sizes.split(",")))
    prompt = llm.render_chat([{"role": "user", "content": PROMPT}])
    free = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    runner = llm.engine.runner
    if args.work_only:
        return _work_only(args, llm, prompt, free)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times: dict[str, list[float]] = {"free": [], "grammar": [], "grammar, prefetch off": []}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        fills: list[float] = []
        for name in times:   # warm-up: the decode program, the grammar compiled, caches touched
            runner.prefetch_masks = name != "grammar, prefetch off"
            _decode_step_time(llm, prompt, free if name == "free" else constrained, batch, False)
        for _ in range(args.rounds):
            for name in times:
                runner.prefetch_masks = name != "grammar, prefetch off"
                params = free if name == "free" else constrained
                step_s, cpu_s, fill_s = _decode_step_time(llm, prompt, params, batch, measure_fill=name == "grammar")
                times[name].append(step_s)
                cpu[name].append(cpu_s)
                fills.extend(f for f in fill_s if f is not None)
        runner.prefetch_masks = True
        base, cpu_base = statistics.median(times["free"]), statistics.median(cpu["free"])
        row = {"batch": batch, "tokens": args.tokens, "grammar_work_ms": 1e3 * statistics.median(fills)}
        row["grammar_work_share"] = statistics.median(fills) / base
        for name, values in times.items():
            row[name + "_ms"] = 1e3 * statistics.median(values)
            row[name + "_overhead"] = statistics.median(values) / base - 1
            row[name + "_cpu_ms"] = 1e3 * statistics.median(cpu[name])
            row[name + "_cpu_overhead"] = statistics.median(cpu[name]) / cpu_base - 1
        rows.append(row)
    _report(args, llm, rows)
    return 0


def _decode_step_time(llm, prompt: list[int], params, batch: int, measure_fill: bool) -> tuple[float, list[float]]:
    """Mean seconds per decode step of `batch` copies of the request, and (if asked) the time to fill
    each step's bitmask, measured on its own after the step."""
    engine = llm.engine
    for _ in range(batch):
        engine.add_request(engine.new_request_id(), list(prompt), params)
    queues = (engine.scheduler.running, engine.scheduler.waiting)
    decode_s, cpu_s, steps, fills = 0.0, 0.0, 0, []
    while engine.has_unfinished_requests():
        decoding = all(r.output_token_ids for q in queues for r in q)   # every request past its prompt
        t, c = time.perf_counter(), time.process_time()
        engine.step()
        if decoding:
            decode_s += time.perf_counter() - t
            cpu_s += time.process_time() - c
            steps += 1
            if measure_fill:
                fills.append(_grammar_work(engine))
    return decode_s / max(1, steps), cpu_s / max(1, steps), fills


def _grammar_work(engine) -> float | None:
    """Seconds to fill the running batch's bitmask and apply it to a logits-sized tensor, outside a step."""
    import torch

    from scaleinfer.structured.bitmask import apply_bitmask, fill_bitmask

    reqs = [r for r in engine.scheduler.running if r.grammar is not None]
    t = time.perf_counter()
    mask = fill_bitmask(reqs)
    if mask is None:
        return None
    logits = torch.zeros(len(reqs), reqs[0].grammar.vocab_size)
    apply_bitmask(logits, mask)
    return time.perf_counter() - t


def _work_only(args, llm, prompt: list[int], free) -> int:
    """Per batch size: the free decode step (model) and the grammar work of a step (no model: masks filled
    and applied to random logits, the argmax accepted), each a median over steps."""
    import torch

    from scaleinfer.sampling_params import StructuredOutputsParams
    from scaleinfer.structured.bitmask import GrammarState, advance, apply_bitmask, fill_bitmask

    compiled = llm.engine.compile_structured(_params_with(StructuredOutputsParams(json=SCHEMA)))
    grammars = llm.engine._grammars
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        _decode_step_time(llm, prompt, free, batch, False)   # warm-up
        step_s, cpu_s, _ = _decode_step_time(llm, prompt, free, batch, False)
        reqs = [_Row(GrammarState(compiled, grammars.stop_token_ids, grammars.vocab_size)) for _ in range(batch)]
        gen = torch.Generator().manual_seed(0)
        work = []
        for _ in range(args.tokens):
            logits = torch.randn(batch, grammars.vocab_size, generator=gen)
            t = time.perf_counter()
            mask = fill_bitmask(reqs)
            apply_bitmask(logits, mask)
            advance(reqs, logits.argmax(dim=-1).tolist())
            work.append(time.perf_counter() - t)
        w = statistics.median(work)
        rows.append({"batch": batch, "free_ms": 1e3 * step_s, "free_cpu_ms": 1e3 * cpu_s, "grammar_work_ms": 1e3 * w,
                     "grammar_work_share": w / step_s})
    load = os.getloadavg()
    print(f"grammar work per decode step: {args.model}, vocabulary {grammars.vocab_size}, {args.tokens} steps, "
          f"load average {load[0]:.1f}")
    print(f"{'batch':>5} {'free step ms':>13} {'grammar work ms':>16} {'share':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['free_ms']:>13.2f} {r['grammar_work_ms']:>16.3f} {100 * r['grammar_work_share']:>6.2f}%")
    _write(args, llm, rows, load)
    return 0


class _Row:
    """The one attribute of a Request that the bitmask functions read."""

    def __init__(self, grammar):
        self.grammar = grammar


def _params_with(spec):
    from scaleinfer import SamplingParams

    return SamplingParams(structured_outputs=spec)


def _report(args, llm, rows: list[dict]) -> None:
    load = os.getloadavg()
    print(f"structured outputs overhead: {args.model}, vocabulary {llm.engine.model_config.vocab_size}, "
          f"{args.tokens} tokens per request, {args.rounds} rounds, load average {load[0]:.1f}")
    print("wall and process-CPU ms per decode step (medians); overhead vs free; grammar work = fill + apply the "
          "batch's bitmask alone, and its share of a free step")
    print(f"{'batch':>5} {'free':>9} {'grammar':>9} {'ovh':>7} {'no-pref':>9} {'ovh':>7} | {'cpu free':>9} "
          f"{'grammar':>9} {'ovh':>7} {'no-pref':>9} {'ovh':>7} | {'work ms':>8} {'share':>6}")
    for r in rows:
        g, n = "grammar", "grammar, prefetch off"
        print(f"{r['batch']:>5} {r['free_ms']:>9.2f} {r[g + '_ms']:>9.2f} {100 * r[g + '_overhead']:>6.1f}% "
              f"{r[n + '_ms']:>9.2f} {100 * r[n + '_overhead']:>6.1f}% | {r['free_cpu_ms']:>9.2f} "
              f"{r[g + '_cpu_ms']:>9.2f} {100 * r[g + '_cpu_overhead']:>6.1f}% {r[n + '_cpu_ms']:>9.2f} "
              f"{100 * r[n + '_cpu_overhead']:>6.1f}% | {r['grammar_work_ms']:>8.3f} {100 * r['grammar_work_share']:>5.1f}%")
    _write(args, llm, rows, load)


def _write(args, llm, rows: list[dict], load) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"structured-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"model": args.model, "load_average": load, "threads": llm.engine.config.threads, "rows": rows},
                  f, indent=1)
    print(f"wrote {path}")
