"""Processes of the data-parallel tests: `python -m scaleinfer serve | router ...` on 127.0.0.1 and a free
port, ready when /health answers 200 (failing at once, with the log, if the process exits; after
START_TIMEOUT_S only if it neither answers nor exits: never on a short fixed deadline)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

MODEL = os.environ.get("SCALEINFER_E2E_MODEL", "smollm2-135m-instruct")
START_TIMEOUT_S = float(os.environ.get("SCALEINFER_E2E_START_TIMEOUT", "600"))
TIMEOUT_S = 180
"""Per-request timeout of the tests' clients: generous, as on a machine busy with other jobs."""
SMALL = ["--model", MODEL, "--max-model-len", "512", "--kv-cache-memory", "64MiB", "--quantization", "none"]
"""Engine flags of every replica here: small KV, fp32 weights (greedy texts compared across replicas)."""


@dataclass
class Proc:
    url: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: str, args: list[str], log_path: str) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "scaleinfer", command, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return Proc(f"http://127.0.0.1:{port}", proc, log_path)


def wait_ready(p: Proc) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if p.proc.poll() is not None:
            pytest.fail(f"{p.url} exited with {p.proc.returncode} before it was ready:\n{p.log()[-3000:]}")
        try:
            if httpx.get(p.url + "/health", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{p.url} was alive but not ready in {START_TIMEOUT_S:.0f} s:\n{p.log()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """SIGTERM, wait (bounded), SIGKILL past it; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total
