"""End-to-end fixtures: the real `python -m scaleinfer serve` on 127.0.0.1 and a free port, started as a
subprocess, polled on /health until it answers (failing at once if it exits); real clients talk to it
over HTTP (or HTTPS) with generous timeouts."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest

MODEL = os.environ.get("SCALEINFER_E2E_MODEL", "smollm2-135m-instruct")
START_TIMEOUT_S = float(os.environ.get("SCALEINFER_E2E_START_TIMEOUT", "300"))
"""Longest wait for a live server process to answer /health (one that exits fails at once)."""
TIMEOUT_S = 120
"""Per-request timeout of the tests' HTTP clients: generous, as on a machine busy with other jobs."""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with metric()'s scrape (the API key of a server that has one)."""

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """One sample of /metrics, e.g. metric("scaleinfer_kv_cache_free_blocks"); `default` if absent."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=TIMEOUT_S).text
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
            if m and m.group(1) == name and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
                return float(m.group(3))
        if default is not None:
            return default
        raise KeyError(f"{name}{labels} not in /metrics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(server: Server, verify=True) -> None:
    """Until the process answers /health: fail at once (with its log) if it exits, and only after
    START_TIMEOUT_S if it neither answers nor exits (a loaded machine loads the model slowly; a kernel
    build on a fresh cache takes minutes), never on a short fixed deadline."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited with {server.proc.returncode} before it was ready:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=10, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server (pid {server.proc.pid}) was alive but did not answer /health in "
                        f"{START_TIMEOUT_S:.0f} s:\n{server.log()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_server(tmp_path_factory, *extra: str, env: dict[str, str] | None = None, tls_cert: str | None = None):
    """A `scaleinfer serve` of its own; tls_cert: the server speaks HTTPS with this (self-signed) cert,
    which the readiness check trusts; env: extra environment variables for the server."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    cmd = [sys.executable, "-m", "scaleinfer", "serve", "--port", str(port), "--model", MODEL, "--threads", "1",
           "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--log-interval", "2", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    scheme = "https" if tls_cert else "http"
    server = Server(f"{scheme}://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until_ready(server, verify=ssl.create_default_context(cafile=tls_cert) if tls_cert else True)
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: default settings (64 running, no key, no queue limit), fp32 weights
    (`--quantization none`): its tests compare texts across requests exactly (stream == non-stream), and
    under w4a8 (the default on this Q4_1 file) a prefix-cache hit runs the remaining prompt rows through
    the decode kernel instead of the prefill GEMM, ~1e-6 apart, which can flip a near-tie greedy token.
    The default mode is served by the soak smoke test and the CLI tests.

    SCALEINFER_E2E_URL=http://host:port runs the tests against a server you started yourself.
    """
    url = os.environ.get("SCALEINFER_E2E_URL")
    if url:
        yield Server(url.rstrip("/"), None, os.devnull)  # type: ignore[arg-type]
        return
    with running_server(tmp_path_factory, "--quantization", "none") as s:
        yield s


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(*extra_cli_args, env=..., tls_cert=...) -> a context manager running a server of the
    test's own."""
    return lambda *extra, **kw: running_server(tmp_path_factory, *extra, **kw)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="session")
def http():
    """An httpx client with the generous TIMEOUT_S (httpx's own default is 5 s)."""
    with httpx.Client(timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="session")
def model_name(server, http) -> str:
    return http.get(server.v1 + "/models").json()["data"][0]["id"]
