"""The engine replicas of `scaleinfer serve --data-parallel-size N` on this host: N `scaleinfer serve`
processes on 127.0.0.1 and free ports, started one after another (each once the one before is ready),
each with its share of the threads (or --replica-threads), the engine flags given to serve, and an
internal API key (random, per start: the replicas' ports are reachable by other users of the machine;
the router sends the key, clients never see it).

Each replica runs in a session of its own (so a Ctrl-C reaches the router, which drains and then stops
them in order) and is told to exit when the router dies (PR_SET_PDEATHSIG on Linux), so no replica
outlives a killed router.
"""
from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from scaleinfer.config import API_KEY_ENV
from scaleinfer.errors import ConfigError

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@dataclass
class LocalReplicas:
    urls: list[str]
    procs: list[subprocess.Popen]
    key: str
    """The internal API key every replica requires."""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def split_threads(total: int | None, n: int, per_replica: int | None) -> int:
    """Threads of each replica: --replica-threads if given, else --threads (default: all cores) / n."""
    if per_replica is not None:
        if per_replica < 1:
            raise ConfigError(f"--replica-threads must be >= 1, got {per_replica}")
        return per_replica
    total = total or os.cpu_count() or 1
    if total < n:
        logger.warning("--threads %d is fewer than --data-parallel-size %d: each replica gets 1 thread", total, n)
    return max(1, total // n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn of a replica: SIGTERM when the router's thread that started it goes away (Linux)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start(n: int, engine_argv: list[str], server_argv: list[str], threads: int, timeout_s: float) -> LocalReplicas:
    """Start n replicas one after another, each once the one before answers /health: a model's load can
    peak at several times its size in memory (e.g. dequantizing before repacking), and N loads at once
    have been killed by the OOM killer here. A ConfigError (and no replica left running) if one fails."""
    key = secrets.token_urlsafe(24)
    env = {**os.environ, API_KEY_ENV: key}
    replicas = LocalReplicas([], [], key)
    try:
        for i in range(n):
            port = _free_port()
            cmd = [sys.executable, "-m", "scaleinfer", "serve", "--host", "127.0.0.1", "--port", str(port),
                   *engine_argv, "--threads", str(threads), *server_argv]
            logger.info("starting replica r%d on 127.0.0.1:%d (%d threads)", i, port, threads)
            replicas.procs.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None))
            replicas.urls.append(f"http://127.0.0.1:{port}")
            _wait_ready(i, replicas.urls[i], replicas.procs[i], timeout_s)
    except BaseException:
        stop(replicas, 10)
        raise
    return replicas


def _wait_ready(i: int, url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until the replica answers /health: a ConfigError at once if it exits, or after timeout_s if it
    neither answers nor exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ConfigError(f"replica r{i} exited with code {proc.returncode} while starting (its log is "
                              f"above{'; -9 is often the OOM killer' if proc.returncode == -9 else ''}); "
                              f"fix the engine flags and start again")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                logger.info("replica r%d is ready at %s", i, url)
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError(f"replica r{i} did not answer /health within {timeout_s:.0f} s "
                              f"(--replica-start-timeout)")
        time.sleep(0.3)


def stop(replicas: LocalReplicas, timeout_s: float) -> None:
    """SIGTERM to every replica (they drain), then wait; SIGKILL past timeout_s."""
    for proc in replicas.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for i, proc in enumerate(replicas.procs):
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("replica r%d did not exit %.0f s after SIGTERM; killing it", i, timeout_s)
            proc.kill()
            proc.wait()
