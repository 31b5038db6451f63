"""Failures of a distributed engine end in one line within a bounded time, and leave no process behind:
a worker killed mid-run (shared memory and gloo), a rank that never joins (driver side and worker side,
through the CLI: exit code 2, no traceback), a driver killed while its workers wait (they die with it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from scaleinfer import LLM, SamplingParams
from scaleinfer.engine.launch import Role, check_device
from scaleinfer.errors import ConfigError, DistributedError, EngineDeadError
from tests.distributed.models import GEMMA, needs
from tests.distributed.ranks import free_port

TIMEOUT = 20


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(") ")[2][:1] in ("Z", "X")
    except OSError:
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


@needs(GEMMA)
@pytest.mark.parametrize("communicator", ["shm", "gloo"])
def test_worker_killed_mid_run_is_one_line_error(communicator):
    llm = LLM(GEMMA, threads=1, tensor_parallel_size=2, kv_cache_memory="16MiB", max_model_len=128,
              distributed_timeout=TIMEOUT, distributed_communicator=communicator)
    params = SamplingParams(max_tokens=4, temperature=0)
    assert llm.generate("Hello", params)[0].outputs[0].token_ids
    worker = llm.engine.executor.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DistributedError) as err:
        llm.generate("Hello again", SamplingParams(max_tokens=64, temperature=0))
    assert time.monotonic() - start < TIMEOUT + 10
    message = str(err.value)
    assert "\n" not in message and "rank 1" in message, message
    with pytest.raises(EngineDeadError):
        llm.generate("once more", params)
    llm.engine.shutdown()
    assert not worker.is_alive()


def _cli(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "scaleinfer", "generate", "Hi", "--model", GEMMA,
                           "--max-tokens", "2", "--threads", "1", "--kv-cache-memory", "16MiB", *args],
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


@needs(GEMMA)
@pytest.mark.parametrize("rank", [0, 1])
def test_rank_that_never_joins_is_one_line_error(rank):
    proc, elapsed = _cli("--tensor-parallel-size", "2", "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}",
                         "--rank", str(rank), "--world-size", "2", "--distributed-timeout", "3")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "build_lock" not in line]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "could not join" in lines[0]
    assert elapsed < 60


@needs(GEMMA)
def test_killed_driver_takes_its_workers_along():
    script = ("import sys, time\nfrom scaleinfer import LLM\n"
              "if __name__ == '__main__':\n"
              f"    llm = LLM({GEMMA!r}, threads=1, tensor_parallel_size=2, kv_cache_memory='16MiB', max_model_len=128)\n"
              "    print(llm.engine.executor.processes[0].pid, flush=True)\n"
              "    time.sleep(120)\n")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(driver.stdout.readline())
        driver.kill()
        driver.wait(timeout=10)
        assert _wait_gone(worker_pid, 15), f"worker {worker_pid} outlived its driver"
    finally:
        if driver.poll() is None:
            driver.kill()


@needs(GEMMA)
def test_more_gpu_ranks_than_gpus_is_one_line_error():
    """NCCL runs one rank per GPU: asking a host for more ranks than it has GPUs is refused before any rank
    starts (a CPU-only machine: no GPU at all; a one-GPU machine: 2 ranks ask for 2)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks = max(2, gpus + 1)
    proc, elapsed = _cli("--device", "cuda", "--tensor-parallel-size", str(ranks))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "build_lock" not in line]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    expected = f"{ranks} ranks on this host need {ranks} GPUs" if gpus else "use --device cpu"
    assert expected in lines[0] and "--device" in lines[0], lines[0]
    if not gpus:
        proc, _ = _cli("--device", "cuda")   # one process asking for a GPU the machine lacks
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "--device cuda: " in proc.stderr and "use --device cpu" in proc.stderr, proc.stderr


def test_a_gpu_device_is_checked_before_any_rank_starts():
    check_device("cpu", Role("tcp://127.0.0.1:1", 0, 2, spawn=True))   # nothing to check
    with pytest.raises(ConfigError, match="write cuda or cuda:N"):
        check_device("cuda:x", None)
    with pytest.raises(ConfigError, match="names one GPU but the engine runs 2 ranks"):
        check_device("cuda:0", Role("tcp://127.0.0.1:1", 0, 2, spawn=True))
