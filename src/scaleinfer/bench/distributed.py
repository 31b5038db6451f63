"""`scaleinfer bench distributed`: one model and a fixed number of threads in total, laid out several ways
side by side in one run: one process x T threads, DP=2 x T/2 (a router in front of two replicas), and
TP=2 / PP=2 x T/2 (engine flags: a build without them reports the row as unsupported). Each layout is a
`scaleinfer serve` measured through its OpenAI endpoint (distributed_probe.py): batch-1 decode, pp512
prefill, and a mixed load (64 requests, 32 in flight: output tok/s, TTFT p50 / p99); plus the router's
overhead per request (straight to the one-process server vs through a `scaleinfer router` in front of
it), and llama.cpp on the same GGUF (decode, prefill) as the single-machine anchor.

All servers start first and stay up (idle while another is measured); decode and prefill rounds are
interleaved over the layouts, the order rotating each round, because the shared machines here drift
within minutes: compare same-run numbers only. Prints a table and writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

from scaleinfer.bench import distributed_probe as probe
from scaleinfer.bench import workloads

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


@dataclass
class Layout:
    name: str
    label: str
    flags: list[str]
    status: str = "ok"
    url: str | None = None
    server: object | None = None
    model: str = ""
    results: dict = field(default_factory=lambda: {"decode_rounds": [], "prefill_rounds": []})


def default_layouts(threads: int) -> list[Layout]:
    half = max(1, threads // 2)
    return [Layout("1proc", f"1 process x {threads} threads", ["--threads", str(threads)]),
            Layout("dp2", f"DP=2 x {half} thread", ["--data-parallel-size", "2", "--replica-threads", str(half)]),
            Layout("tp2", f"TP=2 x {half} thread", ["--tensor-parallel-size", "2", "--threads", str(half)]),
            Layout("pp2", f"PP=2 x {half} thread", ["--pipeline-parallel-size", "2", "--threads", str(half)])]


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, .gguf or HF dir (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads in total, per layout (default: %(default)s)")
    p.add_argument("--quantization", default="auto", help="--quantization of every server (default: %(default)s)")
    p.add_argument("--kv-cache-memory", default="1GiB", help="per engine process (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved decode + prefill rounds (medians reported)")
    p.add_argument("--num-requests", type=int, default=64, help="requests of the mixed load")
    p.add_argument("--concurrency", type=int, default=32, help="mixed requests in flight")
    p.add_argument("--layout", action="append", default=[], metavar="NAME=FLAGS",
                   help="add or replace a layout, e.g. 'tp2=--tensor-parallel-size 2 --threads 1' (serve flags)")
    p.add_argument("--only", default=None, help="comma-separated layout names to run (default: all)")
    p.add_argument("--llamacpp-python", default=None,
                   help="python of a venv with llama-cpp-python: also measure llama.cpp on the same GGUF")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to load")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--log-dir", default=None, help="server logs (default: a new temporary directory)")
    p.add_argument("--quick", action="store_true", help="tiny workloads, one round (a smoke run)")


def layouts_from(args) -> list[Layout]:
    layouts = {lay.name: lay for lay in default_layouts(args.threads)}
    for spec in args.layout:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --layout {spec!r}: write NAME=FLAGS, e.g. 'dp2=--data-parallel-size 2'")
        layouts[name] = Layout(name, name, flags.split())
    chosen = list(layouts.values())
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in layouts]
        if unknown:
            raise SystemExit(f"error: --only {unknown[0]!r}: the layouts are {', '.join(layouts)}")
        chosen = [layouts[n] for n in names]
    return chosen


def workload(args, vocab_size: int) -> probe.Workload:
    mixed = [(r.prompt_ids, r.output_len) for r in workloads.mixed_requests(vocab_size, args.num_requests)]
    prefill, decode = workloads.prefill_prompt(vocab_size), workloads.decode_prompt(vocab_size)
    if args.quick:
        return probe.Workload(prefill[:64], decode, 8, [(ids[:48], min(n, 8)) for ids, n in mixed[:4]], 2, 5)
    return probe.Workload(prefill, decode, workloads.DECODE_TOKENS, mixed, args.concurrency, 50)


def _serve_help() -> str:
    done = subprocess.run([sys.executable, "-m", "scaleinfer", "serve", "--help"], capture_output=True, text=True,
                          timeout=300)
    return done.stdout


def _launch(command: str, flags: list[str], log_path: str, timeout_s: float):
    """`python -m scaleinfer COMMAND --host 127.0.0.1 --port FREE FLAGS`, ready (soak/server.py: start)."""
    from scaleinfer.bench.soak.server import start

    print(f"starting: scaleinfer {command} {' '.join(flags)}", file=sys.stderr, flush=True)
    return start(flags, log_path, timeout_s, command)


def start_layouts(layouts: list[Layout], args, log_dir: str) -> None:
    """Start every supported layout's server; mark the others unsupported / failed (with the reason)."""
    from scaleinfer.bench.serve import _server_model
    from scaleinfer.bench.soak.server import ServerError

    known = _serve_help()
    common = ["--model", args.model, "--quantization", args.quantization, "--kv-cache-memory", args.kv_cache_memory,
              "--max-model-len", "2048", "--no-enable-prefix-caching", "--log-interval", "3600",
              "--max-num-seqs", str(max(args.concurrency, 2))]
    for lay in layouts:
        missing = [f for f in lay.flags if f.startswith("--") and f not in known]
        if missing:
            lay.status = f"unsupported: this build's serve has no {missing[0]}"
            continue
        try:
            lay.server = _launch("serve", common + lay.flags, os.path.join(log_dir, f"{lay.name}.log"),
                                 args.start_timeout)
        except ServerError as exc:
            lay.status = f"failed: {exc} (log: {os.path.join(log_dir, lay.name + '.log')})"
            continue
        lay.url = lay.server.url
        lay.model = _server_model(lay.url, None)


def _llamacpp(args):
    from scaleinfer.bench.core import _spawn_llamacpp

    return _spawn_llamacpp(SimpleNamespace(model=args.model, threads=args.threads, num_requests=1, quick=True,
                                           llamacpp_python=args.llamacpp_python))


def run_rounds(layouts: list[Layout], w: probe.Workload, rounds: int, llamacpp) -> None:
    live = [lay for lay in layouts if lay.url]
    units = live + ([llamacpp] if llamacpp is not None else [])
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}: decode and prefill of each layout", file=sys.stderr, flush=True)
        k = r % max(len(units), 1)
        for unit in units[k:] + units[:k]:
            if unit is llamacpp:
                unit.round()
                continue
            unit.results["decode_rounds"].append(probe.decode_tok_s(unit.url, w, unit.model))
            unit.results["prefill_rounds"].append(probe.prefill_tok_s(unit.url, w, unit.model))
    for lay in live:
        print(f"mixed load on {lay.label}", file=sys.stderr, flush=True)
        before, stage0 = _cpu_s(lay), probe.pipeline_seconds(lay.url)
        lay.results["mixed"] = m = probe.mixed(lay.url, w, lay.model)
        # CPU of the process we started (for DP: the router alone, its replicas are other processes)
        m["main_process_cpu_s"] = _cpu_s(lay) - before
        # PP: the share of the mixed load's wall time the driver computed stage 0 and waited for logits
        # (the bubble stage 0 sees; the rest is scheduling, sampling and HTTP on the driver)
        compute, wait = (b - a for a, b in zip(stage0, probe.pipeline_seconds(lay.url)))
        if compute > 0:
            m["stage0_busy"], m["stage0_wait"] = compute / m["duration_s"], wait / m["duration_s"]
        lay.results["decode_tok_s"] = statistics.median(lay.results["decode_rounds"])
        lay.results["prefill_tok_s"] = statistics.median(lay.results["prefill_rounds"])


def _cpu_s(lay: Layout) -> float:
    import psutil

    t = psutil.Process(lay.server.proc.pid).cpu_times()
    return t.user + t.system


def measure_overhead(layouts: list[Layout], w: probe.Workload, args, log_dir: str) -> dict | None:
    """The router's cost per request, in front of the one-process server."""
    from scaleinfer.bench.soak.server import stop

    base = next((lay for lay in layouts if lay.name == "1proc" and lay.url), None)
    if base is None:
        return None
    router = _launch("router", ["--replica", base.url, "--policy", "round-robin"],
                     os.path.join(log_dir, "router.log"), args.start_timeout)
    try:
        return probe.router_overhead(base.url, router.url, w, base.model)
    finally:
        stop(router.proc, 30)


def _f(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _bubble(m: dict | None) -> str:
    if not m or "stage0_busy" not in m:
        return "-"
    return f"{100 * m['stage0_busy']:.0f}% / {100 * m['stage0_wait']:.0f}%"


def format_table(layouts: list[Layout], llama: dict | None, overhead: dict | None, prefill_len: int) -> str:
    base = next((lay.results.get("mixed") for lay in layouts if lay.name == "1proc"), None)
    lines = [f"| layout | status | decode tok/s | pp{prefill_len} tok/s | mixed tok/s | TTFT p50 ms | TTFT p99 ms "
             f"| mixed vs 1 process | PP stage 0 busy / waits |", "|" + "---|" * 9]
    for lay in layouts:
        m, r = lay.results.get("mixed"), lay.results
        ratio = f"{m['output_tok_s'] / base['output_tok_s']:.2f}x" if m and base else "-"
        lines.append(f"| {lay.label} | {lay.status} | {_f(r.get('decode_tok_s'))} | {_f(r.get('prefill_tok_s'))} | "
                     f"{_f(m and m['output_tok_s'])} | {_f(m and m['ttft_p50_ms'], '{:.0f}')} | "
                     f"{_f(m and m['ttft_p99_ms'], '{:.0f}')} | {ratio} | {_bubble(m)} |")
    if llama is not None:
        lines.append(f"| llama.cpp (same GGUF) | ok | {_f(llama['decode_tok_s'])} | {_f(llama['prefill_tok_s'])} "
                     f"| - | - | - | - |")
    if overhead is not None:
        lines += ["", f"router overhead per request (one-token completion, {overhead['requests']} alternating "
                      f"pairs): median {overhead['overhead_median_ms']:.2f} ms, mean {overhead['overhead_mean_ms']:.2f}"
                      f" ms (direct {overhead['direct_median_ms']:.1f} ms, via router "
                      f"{overhead['routed_median_ms']:.1f} ms)"]
    return "\n".join(lines)


def main(args) -> int:
    from scaleinfer.bench.soak.server import stop
    from scaleinfer.weights.loader import open_checkpoint

    layouts = layouts_from(args)
    w = workload(args, open_checkpoint(args.model).config.vocab_size)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench-distributed-")
    os.makedirs(log_dir, exist_ok=True)   # --log-dir may name a new directory
    load = {"start": os.getloadavg()}
    llamacpp = None
    try:
        start_layouts(layouts, args, log_dir)
        llamacpp = _llamacpp(args) if args.llamacpp_python else None
        run_rounds(layouts, w, 1 if args.quick else args.rounds, llamacpp)
        overhead = measure_overhead(layouts, w, args, log_dir)
        llama = llamacpp.finish() if llamacpp is not None else None
    finally:
        for lay in layouts:
            if lay.server is not None:
                stop(lay.server.proc, 60)
        if llamacpp is not None and llamacpp.proc.poll() is None:
            llamacpp.proc.kill()
    load["end"] = os.getloadavg()
    table = format_table(layouts, llama, overhead, len(w.prefill_ids))
    print(table)
    return _write(args, layouts, llama, overhead, table, load, log_dir)


def _write(args, layouts, llama, overhead, table: str, load: dict, log_dir: str) -> int:
    os.makedirs(args.output_dir, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.output_dir, f"distributed-{stamp}.json")
    record = {"date": stamp, "model": args.model, "threads": args.threads, "quantization": args.quantization,
              "quick": args.quick, "rounds": 1 if args.quick else args.rounds, "num_requests": args.num_requests,
              "concurrency": args.concurrency, "cpu_count": os.cpu_count(), "loadavg": load, "log_dir": log_dir,
              "layouts": [{"name": lay.name, "label": lay.label, "flags": lay.flags, "status": lay.status,
                           **lay.results} for lay in layouts],
              "llamacpp": llama, "router_overhead": overhead, "table": table}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return 0 if any(lay.status == "ok" for lay in layouts) else 1
