"""`scaleinfer serve`: load the engine, run the app under uvicorn, shut down gracefully.

SIGTERM / SIGINT: stop accepting, refuse new requests on open connections (503), let in-flight
requests finish for --shutdown-timeout seconds, then abort the rest (their streams end with an error
event and [DONE], their KV blocks are freed); the lifespan stops the engine and the process exits 0.
A second SIGINT skips the wait.

Connections go through serving.http's guarded h11 protocol (connection cap, request-head deadline and
size); TLS when --ssl-certfile / --ssl-keyfile are given; the API key from --api-key, --api-key-file or
SCALEINFER_API_KEY.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from scaleinfer.config import API_KEY_ENV, api_key_from_env
from scaleinfer.errors import ConfigError
from scaleinfer.serving.app import build_app
from scaleinfer.serving.generation import ServerConfig, ServerState
from scaleinfer.serving.http import guarded_protocol
from scaleinfer.serving.limits import ServerLimits

if TYPE_CHECKING:
    from scaleinfer.engine.engine import LLMEngine

logger = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown first drains the app's requests (ServerState.drain)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_s: float):
        super().__init__(config)
        self.state, self.drain_s = state, drain_s

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # stop accepting now; uvicorn's shutdown closes them again, harmlessly
        await self.state.drain(self.drain_s, force=lambda: self.force_exit)
        await super().shutdown(sockets)


def _default_name(model_arg: str) -> str:
    """A catalog name or hub id as given; a local file or directory by its base name (no .gguf)."""
    if os.path.exists(model_arg):
        base = os.path.basename(os.path.normpath(model_arg))
        return base[:-5] if base.endswith(".gguf") else base
    return model_arg


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio sets TCP_NODELAY per connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def resolve_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key to require: --api-key, else --api-key-file's first line, else SCALEINFER_API_KEY, else none."""
    if api_key is not None and api_key_file is not None:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --api-key-file {api_key_file!r}: {exc}") from None
        if not key:
            raise ConfigError(f"--api-key-file {api_key_file!r} is empty; write the key on its first line")
        return key
    if api_key is not None:
        if not api_key:
            raise ConfigError("--api-key is empty")
        logger.warning("--api-key is visible to every user of this machine (ps); prefer %s or --api-key-file",
                       API_KEY_ENV)
        return api_key
    return api_key_from_env()


def _check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Fail before the model loads if the certificate and key cannot serve TLS."""
    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
    if certfile is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use --ssl-certfile {certfile!r} with --ssl-keyfile {keyfile!r}: {exc}") from None


def run(make_engine: Callable[[], LLMEngine], *, model_arg: str, host: str = "127.0.0.1", port: int = 8000,
        served_model_name: str | None = None, api_key: str | None = None, max_waiting: int | None = None,
        shutdown_timeout: float = 10.0, log_interval_s: float = 10.0, access_log: bool = False,
        limits: ServerLimits = ServerLimits(), enable_docs: bool = True, ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None) -> int:
    """Bind, load the engine (make_engine()), serve until SIGTERM / SIGINT; returns the exit code (0 after
    a graceful shutdown). Binding comes first so that a taken port fails before the model loads."""
    if max_waiting is not None and max_waiting < 1:
        raise ConfigError(f"--max-waiting must be >= 1, got {max_waiting}")
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    _check_tls(ssl_certfile, ssl_keyfile)
    sock = _bind(host, port)
    try:
        engine = make_engine()
    except BaseException:
        sock.close()
        raise
    from scaleinfer.engine.async_engine import AsyncEngine
    from scaleinfer.engine.encoder_engine import EncoderEngine

    encoder = isinstance(engine, EncoderEngine)   # BERT family: serving/embeddings.py's app
    aliases = frozenset(a for a in (model_arg, engine.name if encoder else engine.model_config.name) if a)
    config = ServerConfig(served_model_name=served_model_name or _default_name(model_arg), model_aliases=aliases,
                          api_key=api_key, max_waiting=max_waiting, host=host, port=port,
                          scheme="https" if ssl_certfile else "http", log_interval_s=log_interval_s,
                          limits=limits, enable_docs=enable_docs)
    if encoder:
        from scaleinfer.serving.embeddings import build_encoder_app

        app = build_encoder_app(engine, config)
    else:
        app = build_app(AsyncEngine(engine=engine), config)
    uv_config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                               timeout_graceful_shutdown=5.0, lifespan="on", http=guarded_protocol(limits),
                               h11_max_incomplete_event_size=limits.max_header_bytes,
                               ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    server = _DrainingServer(uv_config, app.state.server, shutdown_timeout)
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers installed
    # beforehand, that re-raise does nothing and we exit 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
