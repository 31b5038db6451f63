"""Run the router under uvicorn: `scaleinfer router --replica URL ...` (replicas anywhere) and `scaleinfer
serve --data-parallel-size N` (replicas started here, launch.py).

The router applies the server's guards itself (serving/guard.py's Gate: API key, body and head limits;
serving/http.py's connection guard; TLS), so replicas behind it need none of them. SIGTERM / SIGINT:
stop accepting, let in-flight requests finish for --shutdown-timeout seconds, then stop the replicas
this router started (they drain too) and exit 0.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field

import httpx
import uvicorn

from scaleinfer.errors import ConfigError
from scaleinfer.serving.generation import ServerConfig
from scaleinfer.serving.guard import Gate
from scaleinfer.serving.http import guarded_protocol
from scaleinfer.serving.limits import ServerLimits
from scaleinfer.serving.router import launch
from scaleinfer.serving.router.metrics import RouterMetrics
from scaleinfer.serving.router.policies import DEFAULT_POLICY, make_policy
from scaleinfer.serving.router.proxy import RouterApp
from scaleinfer.serving.router.replicas import ReplicaSet
from scaleinfer.serving.server import _bind, _check_tls

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RouterOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = DEFAULT_POLICY
    api_key: str | None = None
    limits: ServerLimits = ServerLimits()
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    shutdown_timeout_s: float = 10.0
    health_interval_s: float = 2.0
    replica_timeout_s: float = 600.0
    """Most seconds a replica may stay silent (before its response, or between stream chunks)."""
    enable_docs: bool = True
    """Forward /docs, /redoc and /openapi.json (--disable-docs: 404 at the router)."""
    replica_auth: dict[str, str] = field(default_factory=dict)
    """Headers sent to the replicas (`Authorization: Bearer KEY` when they need a key of their own)."""


@dataclass
class _GateState:
    """What the Gate reads of a server: its config (API key, limits) and where it counts responses."""

    config: ServerConfig
    metrics: RouterMetrics


def _check(opts: RouterOptions) -> None:
    if not 0 < opts.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {opts.port}")
    if not opts.health_interval_s > 0 or not opts.replica_timeout_s > 0:
        raise ConfigError("--health-interval and --replica-timeout must be > 0 seconds")
    make_policy(opts.policy)
    _check_tls(opts.ssl_certfile, opts.ssl_keyfile)


def build_router_app(urls: list[str], opts: RouterOptions, procs=None):
    """The guarded ASGI app of a router in front of `urls` (tests drive it in-process)."""
    metrics = RouterMetrics()
    timeout = httpx.Timeout(opts.replica_timeout_s, connect=CONNECT_TIMEOUT_S, pool=30.0)
    pool = httpx.Limits(max_connections=opts.limits.max_connections,
                        max_keepalive_connections=opts.limits.max_connections)
    client = httpx.AsyncClient(timeout=timeout, limits=pool, trust_env=False)
    replicas = ReplicaSet(urls, metrics, make_policy(opts.policy), client, procs, dict(opts.replica_auth))
    config = ServerConfig(served_model_name="router", api_key=opts.api_key, limits=opts.limits)
    return Gate(RouterApp(replicas, opts.health_interval_s, enable_docs=opts.enable_docs), _GateState(config, metrics))


def _serve(sock, urls: list[str], opts: RouterOptions, procs=None) -> int:
    app = build_router_app(urls, opts, procs)
    limits = opts.limits
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=opts.shutdown_timeout_s, lifespan="on",
                            http=guarded_protocol(limits), h11_max_incomplete_event_size=limits.max_header_bytes,
                            ssl_certfile=opts.ssl_certfile, ssl_keyfile=opts.ssl_keyfile)
    scheme = "https" if opts.ssl_certfile else "http"
    logger.info("router on %s://%s:%d, policy %s, %d replicas: %s%s", scheme, opts.host, opts.port, opts.policy,
                len(urls), ", ".join(f"r{i}={u}" for i, u in enumerate(urls)),
                "" if opts.api_key is None else " (API key required)")
    server = uvicorn.Server(config)
    # as serving/server.py: no-op handlers, so that uvicorn's re-raise of the signal it caught does nothing
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run_router(urls: list[str], opts: RouterOptions) -> int:
    """`scaleinfer router`: serve until SIGTERM / SIGINT in front of replicas started elsewhere."""
    if not urls:
        raise ConfigError("give at least one --replica URL (a `scaleinfer serve` root, e.g. http://host:8000)")
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise ConfigError(f"--replica {bad[0]!r} is not an http:// or https:// URL")
    _check(opts)
    sock = _bind(opts.host, opts.port)
    try:
        return _serve(sock, urls, opts)
    finally:
        sock.close()


def serve_data_parallel(n: int, engine_argv: list[str], server_argv: list[str], threads: int, opts: RouterOptions,
                        start_timeout_s: float = 900.0) -> int:
    """`scaleinfer serve --data-parallel-size N`: bind, start N replicas here one by one, serve."""
    if n < 2:
        raise ConfigError(f"--data-parallel-size must be >= 2 for a router, got {n}")
    _check(opts)
    sock = _bind(opts.host, opts.port)  # a taken port fails before any replica loads
    try:
        local = launch.start(n, engine_argv, server_argv, threads, start_timeout_s)
        try:
            opts = RouterOptions(**{**opts.__dict__, "replica_auth": local.auth})
            return _serve(sock, local.urls, opts, local.procs)
        finally:
            launch.stop(local, max(30.0, opts.shutdown_timeout_s + 20))
    finally:
        sock.close()
