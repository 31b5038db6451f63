"""`scaleinfer bench speculative`: batch-1 greedy decode speed and acceptance of speculative decoding on
three workloads, side by side in one run: no speculation, n-gram prompt lookup, the draft model, any
further drafts (--extra-draft: e.g. a distilled student, `scaleinfer distill`'s output), and llama.cpp on
the same GGUF, plain and with its own prompt-lookup decoding (llama-cpp-python's LlamaPromptLookupDecoding).

Workloads (chat-templated, greedy, up to --max-tokens):
  code-edit   a Python file and an edit to make; the answer repeats most of the file (input-grounded);
  summarize   a passage of a text file (--data-file, e.g. data/shakespeare-en.txt) to
              summarize, quoting it (input-grounded);
  chat        a free-form question (nothing to copy: speculation must not slow it down).

Decode tok/s = (output tokens - 1) / (time from the first to the last token), the best of --rounds.
Greedy outputs are identical with and without speculation (the bench checks it and says so), so every
row decodes the same tokens. Prints a table and writes JSON under --output-dir. Timings on a shared
machine drift: compare rows of one run only.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time

from scaleinfer.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
WORKLOADS = ("code-edit", "summarize", "chat")

CODE = '''import json
import os


class Inventory:
    """A small store of items and their quantities, saved as JSON."""

    def __init__(self, path):
        self.path = path
        self.items = {}
        if os.path.exists(path):
            with open(path) as f:
                self.items = json.load(f)

    def add(self, name, count=1):
        if count <= 0:
            raise ValueError("count must be positive")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count=1):
        have = self.items.get(name, 0)
        if count > have:
            raise ValueError(f"only {have} of {name} left")
        self.items[name] = have - count
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.items, f, indent=2)
'''


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model (default: %(default)s)")
    p.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model of the same tokenizer (default: %(default)s)")
    p.add_argument("--extra-draft", action="append", default=[], metavar="NAME=MODEL",
                   help="another draft row, e.g. 'distilled draft=out/qwen-0.5b-distilled' (repeatable)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="k (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=192, help="tokens per answer (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads of every engine (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs per workload and row; the best counts")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: %(default)s)")
    p.add_argument("--fixed-k", action="store_true",
                   help="always propose k tokens (adaptive k off): measures a draft's acceptance on every step "
                        "instead of only until adaptive k turns it off")
    p.add_argument("--data-file", default="data/shakespeare-en.txt",
                   help="text whose passage the summarize workload quotes (default: %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated rows: none,ngram,draft,<extra names>")
    p.add_argument("--llamacpp-python", default=None,
                   help="python of a venv with llama-cpp-python: also measure llama.cpp (plain and prompt lookup)")
    p.add_argument("--kv-cache-memory", default="512MiB")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="short answers, one round (a smoke run)")


def workload_messages(names: list[str], data_file: str) -> dict[str, list[dict]]:
    out = {}
    for name in names:
        if name == "code-edit":
            text = ("Rename the method `total` to `count_all` and the attribute `items` to `stock` in this "
                    "file. Reply with the whole updated file only.\n\n```python\n" + CODE + "```")
        elif name == "summarize":
            try:
                with open(data_file, encoding="utf-8") as f:
                    passage = f.read()[2000:4500]
            except OSError as e:
                raise ConfigError(f"--data-file {data_file!r}: {e.strerror}; give a text file") from None
            text = ("Summarize the passage below in a few sentences, quoting its most important lines "
                    "word for word.\n\n" + passage)
        elif name == "chat":
            text = "Write a short story about a lighthouse keeper who finds a message in a bottle."
        else:
            raise ConfigError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
        out[name] = [{"role": "user", "content": text}]
    return out


def rows_from(args) -> list[tuple[str, dict | None]]:
    rows: list[tuple[str, dict | None]] = [
        ("none", None),
        ("ngram", {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}),
        ("draft", {"method": "draft", "model": args.draft, "num_speculative_tokens": args.num_speculative_tokens})]
    for spec in args.extra_draft:
        name, sep, model = spec.partition("=")
        if not sep or not name or not model:
            raise ConfigError(f"--extra-draft {spec!r}: write NAME=MODEL, e.g. 'distilled=out/student'")
        rows.append((name, {"method": "draft", "model": model, "num_speculative_tokens": args.num_speculative_tokens}))
    if getattr(args, "fixed_k", False):
        rows = [(name, spec if spec is None else {**spec, "adaptive": False}) for name, spec in rows]
    if args.only:
        keep = {n.strip() for n in args.only.split(",")}
        rows = [r for r in rows if r[0] in keep]
    return rows


def measure(llm, prompts: dict[str, list[int]], max_tokens: int, rounds: int) -> dict:
    from scaleinfer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    spec = llm.engine.speculator
    out = {}
    llm.generate([prompts[next(iter(prompts))]], SamplingParams(temperature=0, max_tokens=8))   # warm-up
    for name, ids in prompts.items():
        best, tokens, before = 0.0, [], (spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens,
                                         spec.stats.num_steps_verified) if spec else None
        for _ in range(rounds):
            res = llm.generate([ids], params)[0]
            m = res.metrics
            n = len(res.outputs[0].token_ids)
            if n > 1 and m.finish_time and m.first_token_time:
                best = max(best, (n - 1) / (m.finish_time - m.first_token_time))
            tokens = res.outputs[0].token_ids
        row = {"decode_tok_s": best, "output_tokens": len(tokens), "token_ids": tokens}
        if spec is not None:
            drafts = spec.stats.num_draft_tokens - before[0]
            accepted = spec.stats.num_accepted_tokens - before[1]
            steps = spec.stats.num_steps_verified - before[2]
            row.update(acceptance_rate=accepted / drafts if drafts else 0.0,
                       mean_accepted_length=(accepted + steps) / steps if steps else 0.0,
                       draft_tokens=drafts, verified_steps=steps)
        out[name] = row
    return out


def run_llamacpp(args, gguf: str, prompts: dict[str, list[int]], max_tokens: int, rounds: int) -> dict:
    worker = os.path.join(os.path.dirname(__file__), "llamacpp_spec_worker.py")
    job = {"gguf": gguf, "threads": args.threads, "max_tokens": max_tokens, "rounds": rounds,
           "num_pred_tokens": args.num_speculative_tokens, "prompts": prompts}
    proc = subprocess.run([args.llamacpp_python, worker], input=json.dumps(job) + "\n", capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        logger.warning("llama.cpp worker failed: %s", proc.stderr.strip().splitlines()[-1:] or proc.returncode)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args) -> int:
    from scaleinfer.llm import LLM
    from scaleinfer.weights.loader import open_checkpoint

    max_tokens, rounds = (48, 1) if args.quick else (args.max_tokens, args.rounds)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    messages = workload_messages(names, args.data_file)
    results: dict[str, dict] = {}
    prompts: dict[str, list[int]] = {}
    start = time.time()
    for row, spec in rows_from(args):
        llm = LLM(args.model, threads=args.threads, kv_cache_memory=args.kv_cache_memory,
                  max_model_len=4096, speculative_config=spec)
        if not prompts:
            prompts = {n: llm.render_chat(m) for n, m in messages.items()}
        print(f"{row}: measuring {', '.join(prompts)} ...", file=sys.stderr, flush=True)
        results[row] = measure(llm, prompts, max_tokens, rounds)
        del llm
    if args.llamacpp_python:
        print("llama.cpp: measuring ...", file=sys.stderr, flush=True)
        results.update({k: v for k, v in run_llamacpp(args, open_checkpoint(args.model).path, prompts, max_tokens,
                                                      rounds).items() if isinstance(v, dict)})
    report(args, results, names, max_tokens, time.time() - start)
    return 0


def report(args, results: dict, names: list[str], max_tokens: int, seconds: float) -> None:
    base = results.get("none", {})
    print(f"\nbatch-1 greedy decode, {args.model}, {args.threads} threads, k = {args.num_speculative_tokens}, "
          f"up to {max_tokens} tokens (load average {os.getloadavg()[0]:.1f})")
    print(f"{'row':<26}" + "".join(f"{n:>34}" for n in names))
    for row, per in results.items():
        cells = []
        for n in names:
            r = per.get(n)
            if r is None:
                cells.append(f"{'-':>34}")
                continue
            speed = r["decode_tok_s"] / base[n]["decode_tok_s"] if n in base and base[n]["decode_tok_s"] else 0.0
            same = "" if n not in base or row.startswith("llama") else \
                (" =" if r["token_ids"] == base[n]["token_ids"] else " !")
            acc = f" acc {r['acceptance_rate']:.2f} len {r['mean_accepted_length']:.2f}" if "acceptance_rate" in r else ""
            cells.append(f"{r['decode_tok_s']:6.1f} tok/s {speed:4.2f}x{acc}{same}".rjust(34))
        print(f"{row:<26}" + "".join(cells))
    print("(= same tokens as no speculation, ! different; speed-ups relative to scaleinfer without speculation)")
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.output_dir, f"speculative-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"model": args.model, "draft": args.draft, "threads": args.threads, "max_tokens": max_tokens,
                   "k": args.num_speculative_tokens, "load_average": os.getloadavg(), "seconds": seconds,
                   "results": results}, f, indent=1)
    print(f"wrote {path}")
