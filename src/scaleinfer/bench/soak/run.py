"""The `scaleinfer bench soak` command: flags, the timed run of N concurrent clients against a server it
starts (or --url), the idle check at the end, the table and the JSON record.

Exit code 0 when every check of report.verdict passes, 1 when one fails, 2 for bad flags.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time

from scaleinfer.bench.soak import report
from scaleinfer.bench.soak.client import Outcome, send
from scaleinfer.bench.soak.mix import MALFORMED_KINDS, MixConfig, draw
from scaleinfer.bench.soak.server import (ServerError, http_status_counts, metric, sample_rss, scrape, start,
                                          stop, wait_idle, wait_ready)
from scaleinfer.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
_UNITS = {"s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """'600', '90s', '10m', '1.5h' -> seconds."""
    unit = text[-1:].lower() if text[-1:].lower() in _UNITS else "s"
    number = text[:-1] if text[-1:].lower() in _UNITS else text
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 600, 90s, 10m") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
    return seconds


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in MALFORMED_KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {', '.join(bad) or '(none)'}; "
                                         f"pick from {','.join(MALFORMED_KINDS)}")
    return kinds


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (started here unless --url)")
    g.add_argument("--url", default=None, help="soak a running server at this root URL instead of starting one")
    g.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, to sample its RSS")
    g.add_argument("--model", default=DEFAULT_MODEL, help="model of the server started here")
    g.add_argument("--threads", type=int, default=None, help="the server's CPU threads (default: all cores)")
    g.add_argument("--max-model-len", type=int, default=None, help="the server's context (default: serve's)")
    g.add_argument("--kv-cache-memory", default="256MiB",
                   help="the server's KV cache size. Its pages count in RSS only once written, and blocks are "
                        "handed out least recently used first, so RSS grows until the whole cache has been "
                        "written: keep it small enough to be written during the warm-up (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="the server's most running requests")
    g.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `scaleinfer serve` (repeatable, e.g. --serve-arg=--max-waiting=32)")
    g.add_argument("--start-timeout", type=float, default=1800.0,
                   help="seconds to wait for /health (a first start compiles the C++ kernels: minutes)")
    g.add_argument("--server-log", default=None, help="file for the server's output (default: a temp file)")
    g = p.add_argument_group("load")
    g.add_argument("--duration", type=duration, default=600.0, help="how long to send requests (600, 90s, 10m)")
    g.add_argument("--concurrency", type=int, default=64, help="clients, each sending one request after another")
    g.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    g.add_argument("--max-tokens", type=int, default=32, help="valid requests ask for 1..N tokens")
    g.add_argument("--disconnect-share", type=float, default=0.1, help="share of valid requests cut mid-way")
    g.add_argument("--malformed-share", type=float, default=0.2, help="share of malformed requests")
    g.add_argument("--malformed-kinds", type=_kinds, default=MALFORMED_KINDS, metavar="KIND,...",
                   help=f"malformed kinds to send (default: all of {','.join(MALFORMED_KINDS)})")
    g.add_argument("--oversized-mib", type=float, default=8.0, help="body size of the oversized_body requests")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    g = p.add_argument_group("checks and output")
    g.add_argument("--warmup", type=duration, default=None,
                   help="RSS samples before this are left out of the slope (default: 120 s, half of a run under 4 "
                        "minutes); the slope is judged over >= 120 s after it")
    g.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    g.add_argument("--max-rss-slope", type=float, default=8.0,
                   help="fail above this RSS growth in MiB/min (a flat 10-minute run measured -6 on a busy 2-core "
                        "machine: smaller leaks need longer runs; default: %(default)s)")
    g.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds to wait for the server to go idle (and free its KV blocks) at the end")
    g.add_argument("--result-dir", default="benchmarks/results")
    g.add_argument("--result-filename", default=None, help="default: soak-<date>.json")
    g.add_argument("--no-save", action="store_true", help="print the table only")


def _check_args(args) -> None:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    for name in ("disconnect_share", "malformed_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.rss_interval <= 0 or args.request_timeout <= 0 or args.oversized_mib <= 0:
        raise ConfigError("--rss-interval, --request-timeout and --oversized-mib must be positive")
    if args.server_pid is not None and args.url is None:
        raise ConfigError("--server-pid goes with --url (a server started here is sampled by itself)")


def _serve_args(args) -> list[str]:
    out = ["--model", args.model, "--log-interval", "30"]
    for flag, value in (("--threads", args.threads), ("--max-model-len", args.max_model_len),
                        ("--kv-cache-memory", args.kv_cache_memory), ("--max-num-seqs", args.max_num_seqs)):
        if value is not None:
            out += [flag, str(value)]
    return out + list(args.serve_arg)


async def _clients(args, client, url: str, cfg: MixConfig, run_start: float) -> list[Outcome]:
    """args.concurrency clients, each drawing and sending requests until the deadline."""
    deadline = run_start + args.duration
    outcomes: list[Outcome] = []

    async def one_client(i: int) -> None:
        rng = random.Random(f"soak:{args.seed}:{i}")
        while time.perf_counter() < deadline:
            outcomes.append(await send(client, url, draw(rng, cfg), run_start))

    async def progress() -> None:
        while True:
            await asyncio.sleep(30)
            five = sum(o.is_5xx for o in outcomes)
            print(f"soak: {time.perf_counter() - run_start:.0f} s, {len(outcomes)} requests, {five} 5xx",
                  file=sys.stderr, flush=True)

    ticker = asyncio.ensure_future(progress())
    try:
        await asyncio.gather(*(one_client(i) for i in range(args.concurrency)))
    finally:
        ticker.cancel()
    return outcomes


async def soak(args, url: str, pid: int | None) -> dict:
    """The run itself against a ready server at url; returns the summary (without the verdict)."""
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=30), limits=limits) as client:
        card = (await client.get(url + "/v1/models", timeout=60)).json()["data"][0]
        before = await wait_idle(client, url, args.idle_timeout)
        free_start = metric(before, "scaleinfer_kv_cache_free_blocks")
        cfg = MixConfig(card["id"], card["max_model_len"], args.max_tokens, args.disconnect_share,
                        args.malformed_share, int(args.oversized_mib * 2**20), args.malformed_kinds)
        rss: list[tuple[float, int]] = []
        stop_rss = asyncio.Event()
        run_start = time.perf_counter()
        sampler = asyncio.ensure_future(sample_rss(pid, args.rss_interval, run_start, stop_rss, rss)) if pid else None
        try:
            outcomes = await _clients(args, client, url, cfg, run_start)
        finally:
            stop_rss.set()
            if sampler is not None:
                await sampler
        load_s = time.perf_counter() - run_start
        try:
            after = await wait_idle(client, url, args.idle_timeout, want_free=free_start)
        except httpx.HTTPError as exc:  # the server died or hangs: no idle state to judge
            print(f"soak: cannot read {url}/metrics after the run: {exc}", file=sys.stderr)
            after = []
    summary = report.summarize_requests(outcomes, load_s)
    before_counts, after_counts = http_status_counts(before), http_status_counts(after)
    delta = {k: v - before_counts.get(k, 0) for k, v in after_counts.items() if v - before_counts.get(k, 0)}
    warmup = args.warmup if args.warmup is not None else report.default_warmup(args.duration)
    summary |= {"model": cfg.model, "max_model_len": cfg.max_model_len,
                "kv": {"blocks": metric(after, "scaleinfer_kv_cache_blocks"), "free_start": free_start,
                       "free_end": metric(after, "scaleinfer_kv_cache_free_blocks")},
                "server_status_counts": delta, "server_5xx": sum(v for k, v in delta.items() if k.startswith("5")),
                "rss": report.summarize_rss(rss, warmup)}
    return summary


def main(args) -> int:
    _check_args(args)
    server = None
    if args.url:
        url = args.url.rstrip("/")
        try:
            wait_ready(url, args.start_timeout)
        except ServerError as exc:
            raise ConfigError(f"{exc}; is the server at --url running?") from None
        pid = args.server_pid
    else:
        log_path = args.server_log or tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log",
                                                                   delete=False).name
        print(f"soak: starting the server (log: {log_path})", file=sys.stderr, flush=True)
        try:
            server = start(_serve_args(args), log_path, args.start_timeout)
        except ServerError as exc:
            raise ConfigError(f"{exc}; see {log_path}") from None
        url, pid = server.url, server.proc.pid
    print(f"soak: {args.concurrency} clients for {args.duration:.0f} s against {url}", file=sys.stderr, flush=True)
    try:
        summary = asyncio.run(soak(args, url, pid))
    finally:
        exit_code = stop(server.proc, 60) if server is not None else None
    summary["server_exit_code"] = exit_code
    summary["verdict"] = report.verdict(summary, args.max_rss_slope)
    print(report.format_table(summary))
    if not args.no_save:
        _save(args, url, server, summary)
    return 0 if summary["verdict"]["passed"] else 1


def _save(args, url: str, server, summary: dict) -> None:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"date": stamp, "command": " ".join(["scaleinfer", *sys.argv[1:]]), "url": url,
              "server_started_here": server is not None, "server_log": server.log_path if server else None,
              "threads": args.threads, "concurrency": args.concurrency, "duration_target_s": args.duration,
              "seed": args.seed, "max_tokens": args.max_tokens, "disconnect_share": args.disconnect_share,
              "malformed_share": args.malformed_share, "malformed_kinds": list(args.malformed_kinds),
              "oversized_mib": args.oversized_mib,
              "cpu_count": os.cpu_count(), **summary}
    os.makedirs(args.result_dir, exist_ok=True)
    path = os.path.join(args.result_dir, args.result_filename or f"soak-{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
