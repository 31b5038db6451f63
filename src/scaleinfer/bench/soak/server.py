"""The server under soak: start `scaleinfer serve` on 127.0.0.1 and a free port, wait until it answers,
read its /metrics, sample its RSS, and stop it with SIGTERM (then wait; kill only past a deadline).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ServerError(Exception):
    """The server under soak could not be started or reached."""


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: str

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(serve_args: list[str], log_path: str, timeout_s: float, command: str = "serve") -> ServerProcess:
    """`python -m scaleinfer COMMAND --host 127.0.0.1 --port FREE *serve_args` (serve or router), ready to serve."""
    port = free_port()
    cmd = [sys.executable, "-m", "scaleinfer", command, "--host", "127.0.0.1", "--port", str(port), *serve_args]
    logger.info("starting: %s (log: %s)", " ".join(cmd), log_path)
    with open(log_path, "w") as log:
        # its own process group, so that a kernel build it started never outlives it (see stop())
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(server.url, timeout_s, proc)
    except BaseException:
        stop(proc, 30)
        raise
    return server


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Poll GET /health until 200 (and the process, if ours, is alive); ServerError past timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"the server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM to the server, wait up to timeout_s for its graceful exit, else SIGKILL; then SIGKILL to
    whatever is left of its process group (a compiler it started). Returns the server's exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the server did not exit %.0f s after SIGTERM; killing it", timeout_s)
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


# ---- /metrics ----------------------------------------------------------------------------------
def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return samples


def metric(samples, name: str, **labels: str) -> float | None:
    """The sum of `name` over the samples whose labels include `labels`; None if there is none."""
    values = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    return sum(values) if values else None


def http_status_counts(samples) -> dict[str, int]:
    """scaleinfer_http_requests_total by status code, all routes together."""
    counts: dict[str, int] = {}
    for name, labels, value in samples:
        if name == "scaleinfer_http_requests_total":
            counts[labels.get("status", "?")] = counts.get(labels.get("status", "?"), 0) + int(value)
    return counts


async def scrape(client: httpx.AsyncClient, url: str):
    r = await client.get(url + "/metrics", timeout=60)
    r.raise_for_status()
    return parse_metrics(r.text)


async def wait_idle(client: httpx.AsyncClient, url: str, timeout_s: float, want_free: float | None = None):
    """Scrape until nothing runs or waits (and, if given, want_free KV blocks are free) or timeout_s
    passes; returns the last samples."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        samples = await scrape(client, url)
        idle = not metric(samples, "scaleinfer_num_requests_running") and \
            not metric(samples, "scaleinfer_num_requests_waiting")
        free = metric(samples, "scaleinfer_kv_cache_free_blocks")
        if (idle and (want_free is None or free == want_free)) or loop.time() > deadline:
            return samples
        await asyncio.sleep(0.5)


# ---- RSS ---------------------------------------------------------------------------------------
async def sample_rss(pid: int, interval_s: float, run_start: float, stop_event: asyncio.Event,
                     out: list[tuple[float, int]]) -> None:
    """Append (seconds since run_start, RSS bytes) of process `pid` every interval_s until stop_event."""
    import psutil

    proc = psutil.Process(pid)
    while not stop_event.is_set():
        try:
            out.append((time.perf_counter() - run_start, proc.memory_info().rss))
        except psutil.Error as exc:
            logger.warning("cannot read the server's RSS: %s", exc)
            return
        try:
            await asyncio.wait_for(stop_event.wait(), interval_s)
        except asyncio.TimeoutError:
            pass
