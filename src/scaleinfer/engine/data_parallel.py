"""Offline data parallel (`LLM(data_parallel_size=N)`): N engine processes on this host, each its own
LLMEngine with its share of the threads; a batch of prompts is spread over them (balanced by prompt +
output length) and the outputs come back in input order.

Each worker is a fresh interpreter (`python -m scaleinfer.engine.data_parallel`: no forked torch or
OpenMP state, and no `if __name__ == "__main__"` guard needed in the caller's script) that loads the
model itself and answers batches as pickles on its stdin / stdout. A worker that fails to load, or
dies, raises a one-line EngineDeadError in the caller; a start waits at most WORKER_START_TIMEOUT_S.
Sampling without a per-request seed differs from one process (each worker draws from its own
generator); greedy outputs are the same.
"""
from __future__ import annotations

import logging
import os
import pickle
import select
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace

from scaleinfer.config import EngineConfig
from scaleinfer.errors import ConfigError, EngineDeadError
from scaleinfer.request import RequestOutput
from scaleinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
WORKER_START_TIMEOUT_S = 1800.0
"""Most seconds a worker may take to load its model (a kernel build on a fresh cache takes minutes)."""


def _run_batch(engine, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
    ids = []
    for prompt, p in zip(prompts, params):
        ids.append(engine.new_request_id())
        engine.add_request(ids[-1], prompt, p)
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return [finished[i] for i in ids]


def _worker_main() -> None:
    """A worker process (`python -m scaleinfer.engine.data_parallel`): read its EngineConfig, load, say
    ready, then answer (prompts, params) batches until None. Messages are pickles on stdin / stdout;
    anything else written to stdout goes to stderr."""
    from scaleinfer.engine.engine import LLMEngine

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    def send(kind: str, value) -> None:
        pickle.dump((kind, value), out)
        out.flush()

    try:
        engine = LLMEngine(pickle.load(inp))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        return send("error", f"{type(exc).__name__}: {exc}")
    send("ready", None)
    while (job := pickle.load(inp)) is not None:
        try:
            send("ok", _run_batch(engine, *job))
        except Exception as exc:  # noqa: BLE001
            send("error", f"{type(exc).__name__}: {exc}")


def shard(costs: list[int], n: int) -> list[list[int]]:
    """Indices of `costs` split into n lists of near-equal total cost (longest first, to the lightest)."""
    shards: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        k = totals.index(min(totals))
        shards[k].append(i)
        totals[k] += costs[i]
    return [sorted(s) for s in shards]


class DataParallelEngines:
    def __init__(self, config: EngineConfig, size: int):
        if size < 1:
            raise ConfigError(f"data_parallel_size must be >= 1, got {size}")
        threads = max(1, (config.threads or os.cpu_count() or 1) // size)
        self._workers: list[subprocess.Popen] = []
        for _ in range(size):
            proc = subprocess.Popen([sys.executable, "-m", "scaleinfer.engine.data_parallel"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._workers.append(proc)
            self._send(proc, replace(config, threads=threads))
        logger.info("data parallel: %d engine processes x %d threads", size, threads)
        for rank in range(size):
            self._receive(rank, WORKER_START_TIMEOUT_S, "starting")

    @staticmethod
    def _send(proc: subprocess.Popen, obj) -> None:
        pickle.dump(obj, proc.stdin)
        proc.stdin.flush()

    def _receive(self, rank: int, timeout_s: float | None, doing: str):
        proc = self._workers[rank]
        try:
            ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
            if not ready:
                raise EngineDeadError(f"data-parallel worker {rank} did not answer in {timeout_s:.0f} s while {doing}")
            kind, value = pickle.load(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            self.close()
            raise EngineDeadError(f"data-parallel worker {rank} died while {doing} (exit code {proc.poll()}); "
                                  f"its log is above") from None
        if kind == "error":
            self.close()
            raise EngineDeadError(f"data-parallel worker {rank} failed while {doing}: {value}")
        return value

    def generate(self, prompts: Sequence, params: list[SamplingParams]) -> list[RequestOutput]:
        costs = [(len(p) // 4 if isinstance(p, str) else len(p)) + (sp.max_tokens or 0) * sp.n
                 for p, sp in zip(prompts, params)]
        shards = shard(costs, len(self._workers))
        try:
            for proc, idx in zip(self._workers, shards):
                self._send(proc, ([prompts[i] for i in idx], [params[i] for i in idx]))
        except OSError:
            self.close()
            raise EngineDeadError("a data-parallel worker died; create the LLM again") from None
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for rank, idx in enumerate(shards):
            for i, out in zip(idx, self._receive(rank, None, "generating")):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def close(self) -> None:
        for proc in self._workers:
            try:
                self._send(proc, None)
                proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in self._workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self._workers = []


if __name__ == "__main__":
    _worker_main()
