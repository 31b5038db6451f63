"""serve | router: the OpenAI-compatible server, data-parallel replicas behind it, and the router across hosts."""
from __future__ import annotations

import argparse
import logging

from scaleinfer.cli.common import engine_args, make_llm


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
    return run(lambda: _engine_of(make_llm(args)), model_arg=args.model, host=args.host, port=args.port,
               served_model_name=args.served_model_name, api_key=resolve_api_key(args.api_key, args.api_key_file),
               max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout,
               log_interval_s=args.log_interval, limits=limits, enable_docs=not args.disable_docs,
               ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)


def _engine_of(llm):
    """The LLM's engine: its decoder engine, or the EncoderEngine of an embedding / classifier model."""
    return llm.engine if llm.encoder is None else llm.encoder


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


def register(sub) -> None:
    from scaleinfer.serving.router.policies import DEFAULT_POLICY, POLICIES

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE, /metrics)")
    known = set(map(id, p._actions))
    engine_args(p)
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
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=list(POLICIES),
                   help="how a request picks its replica (default: %(default)s)")
    _listen_args(p.add_argument_group("server"))
    g = p.add_argument_group("router")
    _router_args(g)
    g.add_argument("--replica-api-key-file", default=None, metavar="FILE",
                   help="send the replicas this key (FILE's first line) instead of the client's Authorization")
    _limit_args(p)
    p.set_defaults(fn=cmd_router)
