"""End-to-end fixtures: the real `python -m scaleinfer serve` on 127.0.0.1 and a free port, started as a
subprocess, polled on /health until it answers; real clients talk to it over HTTP."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

MODEL = os.environ.get("SCALEINFER_E2E_MODEL", "smollm2-135m-instruct")
START_TIMEOUT_S = 240


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """One sample of /metrics, e.g. metric("scaleinfer_kv_cache_free_blocks"); `default` if absent."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
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


@contextlib.contextmanager
def running_server(tmp_path_factory, *extra: str):
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    cmd = [sys.executable, "-m", "scaleinfer", "serve", "--port", str(port), "--model", MODEL, "--threads", "1",
           "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--log-interval", "2", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{server.log()[-3000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health in {START_TIMEOUT_S} s:\n{server.log()[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: default settings (64 running, no key, no queue limit).

    SCALEINFER_E2E_URL=http://host:port runs the tests against a server you started yourself.
    """
    url = os.environ.get("SCALEINFER_E2E_URL")
    if url:
        yield Server(url.rstrip("/"), None, os.devnull)  # type: ignore[arg-type]
        return
    with running_server(tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(*extra_cli_args) -> a context manager running a server of the test's own."""
    return lambda *extra: running_server(tmp_path_factory, *extra)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return httpx.get(server.v1 + "/models").json()["data"][0]["id"]
