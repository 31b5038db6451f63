"""The `scaleinfer` command: generate | chat | demo | serve | router | models | pull | quantize |
bench [serve | long-context | soak | distributed].

Every ScaleInferError becomes one line on stderr and exit code 2; no tracebacks for bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from scaleinfer.config import (DEFAULT_MODEL, DISTRIBUTED_COMMUNICATORS, KV_CACHE_DTYPES, QUANTIZATION_MODES,
                               CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, format_memory)
from scaleinfer.errors import ScaleInferError


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL, help="catalog name (see `scaleinfer models`), a .gguf file, "
                                                          "an HF directory or hub id (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=SchedulerConfig.max_model_len,
                   help="longest prompt + output in tokens (default: %(default)s)")
    g.add_argument("--kv-cache-memory", default=format_memory(CacheConfig.kv_cache_memory),
                   help="memory for the paged KV cache, e.g. 512MiB (default: %(default)s)")
    g.add_argument("--dtype", default=EngineConfig.dtype, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: %(default)s)")
    g.add_argument("--threads", type=int, default=EngineConfig.threads, help="CPU threads (default: all cores)")
    g.add_argument("--device", default=EngineConfig.device, help="cpu or cuda (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="most requests running at once (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
                   help="token budget of one step (default: %(default)s)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=CacheConfig.enable_prefix_caching,
                   help="reuse KV blocks of shared prompt prefixes (default: %(default)s)")
    from scaleinfer.quantization.table import cli_help

    g.add_argument("--quantization", default=EngineConfig.quantization, choices=QUANTIZATION_MODES,
                   help=cli_help() + " (default: %(default)s)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache storage (default: %(default)s): auto (CPU: float16, bfloat16 for bfloat16 "
                        "models; GPU: the model's "
                        "dtype), float32, float16, bfloat16, or int8 (per-token, per-head scales)")
    g.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="int4 modes: GPTQ-round the weights on the model's activations over this text (slower "
                        "load; `scaleinfer quantize --calibration` saves the result)")
    g.add_argument("--attention-pattern", default=None,
                   help="override every layer's attention: causal, window=W, sinks=S,window=W (bounded KV for "
                        "endless streams), window=W,global=0:64 (Longformer), block=64,local=4,stride=8")
    _parallel_args(p)


def _parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (vLLM's names)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=ParallelConfig.tensor_parallel_size,
                   help="ranks that split every layer (Megatron-style); on one machine they are spawned here "
                        "(default: %(default)s)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=ParallelConfig.pipeline_parallel_size,
                   help="ranks that hold contiguous layer stages (default: %(default)s)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=ParallelConfig.data_parallel_size,
                   help="engine replicas behind one endpoint (default: %(default)s)")
    g.add_argument("--distributed-init-method", default=None, metavar="tcp://HOST:PORT",
                   help="rank 0's address when the ranks are started by hand on several machines (with --rank "
                        "and --world-size); under torchrun its environment is used")
    g.add_argument("--rank", type=int, default=None, help="this process's rank (with --distributed-init-method)")
    g.add_argument("--world-size", type=int, default=None, help="number of ranks (with --distributed-init-method)")
    g.add_argument("--distributed-timeout", type=float, default=ParallelConfig.distributed_timeout,
                   help="seconds to wait for every rank to join, and for a peer in a collective (default: "
                        "%(default)s)")
    g.add_argument("--distributed-communicator", default=ParallelConfig.communicator,
                   choices=DISTRIBUTED_COMMUNICATORS,
                   help="tensor-parallel collectives: shm (shared memory, one host), gloo, auto (default: "
                        "%(default)s)")


def _parallel_config(args) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          data_parallel_size=args.data_parallel_size,
                          distributed_init_method=args.distributed_init_method, rank=args.rank,
                          world_size=args.world_size, distributed_timeout=args.distributed_timeout,
                          communicator=args.distributed_communicator)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _make_llm(args):
    from scaleinfer.llm import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               kv_cache_memory=args.kv_cache_memory, threads=args.threads, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=args.enable_prefix_caching,
               quantization=args.quantization,
               kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
               attention_pattern=args.attention_pattern, calibration=args.calibration,
               parallel=_parallel_config(args))


def _is_worker_rank(args) -> bool:
    """Whether this process is a rank other than 0 of a distributed engine (torchrun's or --rank)."""
    if "tensor_parallel_size" not in vars(args):
        return False
    from scaleinfer.engine.launch import resolve_role

    from dataclasses import replace

    # Data parallel sits above the engine (serve's router, LLM's engine processes): each replica is one engine.
    role = resolve_role(replace(_parallel_config(args), data_parallel_size=1))
    return role is not None and role.rank != 0


def _make_params(args):
    from scaleinfer.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _stream_print(llm, prompt, params, out=sys.stdout) -> tuple[str, int, float, float | None]:
    """Stream one request to `out`; returns (text, output tokens, seconds, seconds to first token)."""
    start = time.perf_counter()
    first = None
    printed = 0
    final = None
    for final in llm.stream(prompt, params):
        text = final.outputs[0].text
        if first is None and final.outputs[0].token_ids:
            first = time.perf_counter() - start
        out.write(text[printed:])
        out.flush()
        printed = len(text)
    elapsed = time.perf_counter() - start
    assert final is not None
    return final.outputs[0].text, len(final.outputs[0].token_ids), elapsed, first


def _speed_line(num_tokens: int, elapsed: float, ttft: float | None) -> str:
    decode = ""
    if ttft is not None and num_tokens > 1 and elapsed > ttft:
        decode = f", decode {(num_tokens - 1) / (elapsed - ttft):.1f} tok/s"
    return f"[{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tok/s{decode}]"


def cmd_generate(args) -> int:
    params = _make_params(args)
    llm = _make_llm(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    _, n, elapsed, ttft = _stream_print(llm, prompt, params)
    print()
    print(_speed_line(n, elapsed, ttft), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = _make_params(args)
    llm = _make_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text, n, elapsed, ttft = _stream_print(llm, llm.render_chat(messages), params)
        print()
        print(_speed_line(n, elapsed, ttft), file=sys.stderr)
        messages.append({"role": "assistant", "content": text})


def cmd_demo(args) -> int:
    """The `make run` job: one completion and one chat reply with the default model, with speeds."""
    from scaleinfer.sampling_params import SamplingParams

    start = time.perf_counter()
    llm = _make_llm(args)
    eng = llm.engine
    print(f"model {args.model} (quantization {args.quantization}): loaded in {time.perf_counter() - start:.1f} s, "
          f"KV cache {eng.kv_capacity_tokens} tokens, threads {__import__('torch').get_num_threads()}")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    prompt = "The three most important inventions of the 20th century are"
    print(f"\n--- completion ---\n{prompt}", end="")
    _, n, elapsed, ttft = _stream_print(llm, prompt, params)
    print("\n" + _speed_line(n, elapsed, ttft))
    question = "What is the capital of France? Answer in one sentence."
    print(f"\n--- chat ---\nuser: {question}\nassistant: ", end="")
    ids = llm.render_chat([{"role": "user", "content": question}])
    _, n, elapsed, ttft = _stream_print(llm, ids, params)
    print("\n" + _speed_line(n, elapsed, ttft))
    return 0


def cmd_models(args) -> int:
    from scaleinfer import catalog

    print(f"{'name':32} {'arch':8} {'quant':8} {'installed':9}  description")
    for e in catalog.list_models():
        print(f"{e.name:32} {e.architecture:8} {e.quantization:8} {'yes' if e.installed else 'no':9}  "
              f"{e.description}")
    return 0


def cmd_pull(args) -> int:
    from scaleinfer import catalog

    path = catalog.pull(args.name)
    print(path)
    return 0


def cmd_quantize(args) -> int:
    from scaleinfer.engine.loading import quantize_to_dir

    if args.threads is not None:
        __import__("torch").set_num_threads(args.threads)
    start = time.perf_counter()
    config = quantize_to_dir(args.model, args.quantization, args.output, overwrite=args.overwrite,
                             calibration=args.calibration)
    layers = config["quantization"]["layers"].values()
    packed = sum(spec["method"] != "rows" for spec in layers)   # a split layer's bands are counted, not it
    print(f"wrote {args.output}: {config['quantization']['mode']}, {packed} packed linears, in "
          f"{time.perf_counter() - start:.1f} s; load it with --model {args.output}")
    return 0


def cmd_bench(args) -> int:
    from scaleinfer.bench.core import main as bench_main

    return bench_main(args)


def _serve_logging(args) -> None:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "huggingface_hub", "filelock", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _limits(args):
    from scaleinfer.config import parse_memory
    from scaleinfer.serving.limits import ServerLimits

    return ServerLimits(max_request_bytes=parse_memory(args.max_request_bytes, "--max-request-bytes"),
                        max_seqs_per_request=args.max_seqs_per_request, max_connections=args.max_connections,
                        max_header_bytes=parse_memory(args.max_header_bytes, "--max-header-bytes"),
                        header_timeout_s=args.header_timeout)


def cmd_serve(args) -> int:
    _serve_logging(args)
    from scaleinfer.serving.server import resolve_api_key, run

    limits = _limits(args)
    if args.data_parallel_size != 1:
        return _serve_data_parallel(args, limits)
    return run(lambda: _make_llm(args).engine, model_arg=args.model, host=args.host, port=args.port,
               served_model_name=args.served_model_name, api_key=resolve_api_key(args.api_key, args.api_key_file),
               max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout,
               log_interval_s=args.log_interval, limits=limits, enable_docs=not args.disable_docs,
               ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)


def _router_options(args, limits, policy: str):
    from scaleinfer.serving.router.server import RouterOptions
    from scaleinfer.serving.server import resolve_api_key

    return RouterOptions(host=args.host, port=args.port, policy=policy,
                         api_key=resolve_api_key(args.api_key, args.api_key_file), limits=limits,
                         ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                         shutdown_timeout_s=args.shutdown_timeout, health_interval_s=args.health_interval,
                         replica_timeout_s=args.replica_timeout, enable_docs=not args.disable_docs)


def _replica_argv(args, actions) -> list[str]:
    """The flags of `actions` as parsed, to start a replica with (every engine flag; --threads is split)."""
    out: list[str] = []
    for a in actions:
        value = getattr(args, a.dest)
        if a.dest in ("threads", "data_parallel_size") or value is None:   # a replica is one engine
            continue
        if a.nargs == 0:  # a switch: given only when it differs from its default
            if value != a.default:
                flag = a.option_strings[0]
                out.append(flag if value or isinstance(a, argparse._StoreFalseAction) else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for v in value:
                out += [a.option_strings[0], str(v)]
        else:
            out += [a.option_strings[0], str(value)]
    return out


def _serve_data_parallel(args, limits) -> int:
    from scaleinfer.errors import ConfigError
    from scaleinfer.serving.router.launch import split_threads
    from scaleinfer.serving.router.server import serve_data_parallel

    if args.data_parallel_size < 1:
        raise ConfigError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    server_argv = _replica_argv(args, args.replica_server_actions)
    if args.served_model_name is None:  # every replica and /v1/models name the model as given
        from scaleinfer.serving.server import _default_name

        server_argv += ["--served-model-name", _default_name(args.model)]
    threads = split_threads(args.threads, args.data_parallel_size, args.replica_threads)
    return serve_data_parallel(args.data_parallel_size, _replica_argv(args, args.engine_actions), server_argv,
                               threads, _router_options(args, limits, args.router_policy),
                               start_timeout_s=args.replica_start_timeout)


def cmd_router(args) -> int:
    _serve_logging(args)
    from scaleinfer.serving.router.server import run_router
    from scaleinfer.serving.server import resolve_api_key

    opts = _router_options(args, _limits(args), args.policy)
    if args.replica_api_key_file is not None:  # the replicas' own key, instead of the client's
        from dataclasses import replace

        key = resolve_api_key(None, args.replica_api_key_file)
        opts = replace(opts, replica_auth={"Authorization": f"Bearer {key}"})
    return run_router(args.replica, opts)


def _same_file(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def cmd_eval_perplexity(args) -> int:
    import json

    from scaleinfer.bench.perplexity import perplexity

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if args.calibration and _same_file(args.calibration, args.text):
        from scaleinfer.errors import ConfigError

        raise ConfigError("--calibration is the --text being scored: calibrate on a different text, or the "
                          "perplexity overstates the quantized model")
    start = time.perf_counter()
    llm = _make_llm(args)
    load_s = time.perf_counter() - start
    result = perplexity(llm, text, window=args.window, max_windows=args.max_windows, step=args.step)
    from scaleinfer.weights.quantized import mode_label, quantization_of

    # a `scaleinfer quantize` dir's own mode, else the one asked for (calibrated on the fly or not)
    mode = quantization_of(llm.engine.checkpoint_path) or mode_label(args.quantization, args.calibration)
    record = {"step": args.step, "model": args.model, "text": args.text, "quantization": mode,
              "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"), "load_s": load_s, **result.to_dict()}
    print(f"perplexity {result.perplexity:.4f} over {result.num_tokens} tokens ({result.num_windows} windows of "
          f"{result.window}), {result.tokens_per_s:.0f} tok/s, quantization {mode}")
    if args.json:
        print(json.dumps(record))
    return 0


def cmd_bench_long_context(args) -> int:
    from scaleinfer.bench.long_context import main as long_context_main

    return long_context_main(args)


def cmd_bench_serve(args) -> int:
    from scaleinfer.bench.serve import main as bench_serve_main

    return bench_serve_main(args)


def cmd_bench_distributed(args) -> int:
    from scaleinfer.bench.distributed import main as distributed_main

    return distributed_main(args)


def cmd_bench_soak(args) -> int:
    from scaleinfer.bench.soak.run import main as soak_main

    return soak_main(args)


def cmd_plan(args) -> int:
    from scaleinfer.plan.command import main as plan_main

    return plan_main(args)


def _listen_args(g) -> None:
    """Where and how a server listens: address, API key, TLS, docs, shutdown (serve and router)."""
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health; visible in `ps`: "
                        "prefer --api-key-file or the SCALEINFER_API_KEY environment variable")
    g.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from FILE's first line")
    g.add_argument("--disable-docs", action="store_true", help="do not serve /docs, /redoc and /openapi.json")
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this PEM certificate (chain)")
    g.add_argument("--ssl-keyfile", default=None, help="the PEM private key of --ssl-certfile")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may finish after SIGTERM before they are aborted")


def _limit_args(p: argparse.ArgumentParser) -> None:
    from scaleinfer.serving.limits import ServerLimits

    g = p.add_argument_group("limits")
    g.add_argument("--max-request-bytes", default=str(ServerLimits.max_request_bytes),
                   help="largest request body, e.g. 4MiB; bigger gets 413 unread (default: %(default)s)")
    g.add_argument("--max-seqs-per-request", type=int, default=ServerLimits.max_seqs_per_request,
                   help="most sequences (prompts x n) in one request; more get 400 (default: %(default)s)")
    g.add_argument("--max-connections", type=int, default=ServerLimits.max_connections,
                   help="most open connections; one more gets 503 and is closed (default: %(default)s)")
    g.add_argument("--max-header-bytes", default=str(ServerLimits.max_header_bytes),
                   help="largest request head (line + headers); bigger gets 431 (default: %(default)s)")
    g.add_argument("--header-timeout", type=float, default=ServerLimits.header_timeout_s,
                   help="seconds a client may take to send a request head (default: %(default)s)")


def _router_args(g) -> None:
    g.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between health checks of each replica (default: %(default)s)")
    g.add_argument("--replica-timeout", type=float, default=600.0,
                   help="most seconds a replica may stay silent (before answering, or between stream chunks) "
                        "(default: %(default)s)")


def _data_parallel_args(p: argparse.ArgumentParser) -> None:
    from scaleinfer.serving.router.policies import DEFAULT_POLICY, POLICIES

    g = p.add_argument_group("data parallel")
    g.add_argument("--router-policy", default=DEFAULT_POLICY, choices=list(POLICIES),
                   help="how a request picks its replica (default: %(default)s)")
    g.add_argument("--replica-threads", type=int, default=None,
                   help="threads of each replica (default: --threads, or all cores, split between them)")
    g.add_argument("--replica-start-timeout", type=float, default=900.0,
                   help="most seconds the replicas may take to load (default: %(default)s)")
    _router_args(g)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleinfer", description="Transformer inference that scales.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt (argument or stdin), streaming")
    p.add_argument("prompt", nargs="?", default=None)
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's template, streaming")
    p.add_argument("--system", default=None, help="system prompt")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("demo", help="a completion and a chat reply with the default model, with speeds")
    _engine_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE, /metrics)")
    known = set(map(id, p._actions))
    _engine_args(p)
    engine_actions = [a for a in p._actions if id(a) not in known]
    g = p.add_argument_group("server")
    _listen_args(g)
    known = set(map(id, p._actions))
    g.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="most sequences (prompts x n) waiting for their first token; more get 429 "
                        "(default: no limit; with --data-parallel-size: per replica)")
    g.add_argument("--log-interval", type=float, default=10.0, help="seconds between throughput log lines")
    _limit_args(p)
    server_actions = [a for a in p._actions if id(a) not in known]
    _data_parallel_args(p)
    p.set_defaults(fn=cmd_serve, engine_actions=engine_actions, replica_server_actions=server_actions)

    p = sub.add_parser("router", help="one OpenAI endpoint in front of `scaleinfer serve` replicas on other hosts "
                                      "(data parallel: load balancing, failover, per-replica /metrics)")
    p.add_argument("--replica", action="append", default=[], metavar="URL", required=True,
                   help="a replica's root URL, e.g. http://10.0.0.2:8000 (repeat for each)")
    from scaleinfer.serving.router.policies import DEFAULT_POLICY, POLICIES

    p.add_argument("--policy", default=DEFAULT_POLICY, choices=list(POLICIES),
                   help="how a request picks its replica (default: %(default)s)")
    _listen_args(p.add_argument_group("server"))
    g = p.add_argument_group("router")
    _router_args(g)
    g.add_argument("--replica-api-key-file", default=None, metavar="FILE",
                   help="send the replicas this key (FILE's first line) instead of the client's Authorization")
    _limit_args(p)
    p.set_defaults(fn=cmd_router)

    p = sub.add_parser("eval", help="quality evaluation (perplexity)")
    eval_sub = p.add_subparsers(dest="eval_mode", metavar="{perplexity}", required=True)
    p = eval_sub.add_parser("perplexity", help="perplexity of a text file, non-overlapping windows")
    _engine_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, e.g. data/shakespeare-en.txt")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--step", type=int, default=None,
                   help="feed each window N tokens per forward pass through the KV cache (1: the decode path, "
                        "which is what w4a8's int8 activations affect); default: the whole window at once")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(fn=cmd_eval_perplexity)

    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("pull", help="install a catalog model")
    p.add_argument("name")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("quantize", help="write a quantized checkpoint directory (load it with --model DIR)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="catalog name, a .gguf file, an HF directory or hub id (the source to quantize)")
    p.add_argument("--quantization", required=True,
                   help=f"one of {', '.join(m for m in QUANTIZATION_MODES if m not in ('none', 'auto'))} "
                        f"(see --quantization of generate)")
    p.add_argument("--output", required=True, help="directory to write (new, empty, or an earlier quantize output)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="int4 modes: round with GPTQ on the model's activations over this text (up to 32 "
                        "windows of 512 tokens) instead of to nearest; use a text you will not evaluate on")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("bench", help="benchmark against HF transformers (prefill, decode, mixed load)")
    _engine_args(p)
    p.add_argument("--no-hf", action="store_true", help="measure scaleinfer only")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="smaller workloads (smoke run), one round")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved pp512 + tg128 rounds per engine (medians are reported)")
    p.add_argument("--modes", default=None,
                   help="comma-separated scaleinfer modes, each QUANTIZATION[:KV_DTYPE], e.g. "
                        "none,int8,int4,w8a8,w8a8:int8 (default: --quantization)")
    p.add_argument("--llamacpp-python", default=None,
                   help="python of a venv with llama-cpp-python: also measure llama.cpp on the same GGUF")
    p.set_defaults(fn=cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_mode", metavar="{serve,long-context,soak,distributed}")
    from scaleinfer.bench.serve import add_arguments as add_bench_serve_arguments

    p = bench_sub.add_parser("serve", help="serving benchmark of any OpenAI-compatible endpoint "
                                           "(vLLM benchmark_serving semantics)")
    add_bench_serve_arguments(p)
    p.set_defaults(fn=cmd_bench_serve)
    from scaleinfer.bench.long_context import add_arguments as add_long_context_arguments

    p = bench_sub.add_parser("long-context", help="prefill time, KV memory and RSS of attention patterns vs "
                                                  "sequence length; perplexity of a long stream per pattern")
    add_long_context_arguments(p)
    p.set_defaults(fn=cmd_bench_long_context)
    from scaleinfer.bench.soak.run import add_arguments as add_soak_arguments

    p = bench_sub.add_parser("soak", help="minutes of mixed traffic (streams, disconnects, malformed requests) "
                                          "against a real server: no 5xx, KV blocks back, flat RSS")
    add_soak_arguments(p)
    p.set_defaults(fn=cmd_bench_soak)
    from scaleinfer.plan.command import add_arguments as add_plan_arguments

    p = sub.add_parser("plan", help="memory, latency, throughput and communication of tp x pp x dp layouts of a "
                                    "model on devices (arithmetic, nothing runs); recommends one")
    add_plan_arguments(p)
    p.set_defaults(fn=cmd_plan)
    from scaleinfer.bench.distributed import add_arguments as add_distributed_arguments

    p = bench_sub.add_parser("distributed", help="one process vs data / tensor / pipeline parallel layouts on the "
                                                 "same threads: decode, prefill, mixed load, router overhead")
    add_distributed_arguments(p)
    p.set_defaults(fn=cmd_bench_distributed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the start-up summary (model, KV capacity in tokens, threads)
        logging.getLogger("scaleinfer.engine.engine").setLevel(logging.INFO)
    try:
        if _is_worker_rank(args):   # torchrun / --rank R > 0: serve rank 0's engine, no command of its own
            _make_llm(args)
        return args.fn(args)
    except ScaleInferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
