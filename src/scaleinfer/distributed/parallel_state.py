"""The process group of one distributed engine on torch.distributed: who this rank is, its tensor- and
pipeline-parallel groups, and whether all ranks share this host.

Ranks are laid out as vLLM's: rank = pp_rank * tp_size + tp_rank, so a tensor-parallel group is a run
of consecutive ranks (one pipeline stage) and a pipeline group takes one rank of each stage. gloo on
the CPU, NCCL on GPUs. Joining is bounded by the timeout: a rank that never joins is a one-line
DistributedError, not a hang.
"""
from __future__ import annotations

import datetime
import logging
import socket
import time
from dataclasses import dataclass

import torch.distributed as dist

from scaleinfer.errors import DistributedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelState:
    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    backend: str
    tp_group: object = None
    """The torch ProcessGroup of this rank's tensor-parallel group (None on one rank)."""
    pp_group: object = None
    """The torch ProcessGroup of this rank's pipeline group (None on one rank)."""
    control_group: object = None
    """A gloo group of every rank without a collective timeout: workers wait on it for the next step."""
    cpu_group: object = None
    """A gloo group of every rank with the timeout, for CPU tensors (None: the default group, gloo already)."""
    same_host: bool = True
    """Whether every rank runs on this host (shared memory can connect them)."""

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this rank's tensor-parallel group (its pipeline stage)."""
        first = self.pp_rank * self.tp_size
        return list(range(first, first + self.tp_size))

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline group (one per stage), first stage first."""
        return [p * self.tp_size + self.tp_rank for p in range(self.pp_size)]


SINGLE = ParallelState(rank=0, world_size=1, tp_size=1, pp_size=1, backend="none")
"""The state of an engine in one process."""

_FOREVER = datetime.timedelta(days=365)


def init_distributed(init_method: str, rank: int, world_size: int, tp_size: int, pp_size: int,
                     timeout_s: float, device: str = "cpu") -> ParallelState:
    """Join the process group at `init_method` (tcp://HOST:PORT or env://) and build the groups."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0 and init_method.startswith("tcp://"):
        _wait_reachable(init_method, rank, world_size, timeout_s)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout)
    except Exception as exc:  # store timeouts, refused connections, bad addresses: all one line
        raise DistributedError(f"rank {rank} of {world_size} could not join the process group at {init_method} "
                               f"within {timeout_s:g} s ({_first_line(exc)}); start every rank with the same "
                               f"--distributed-init-method and --world-size, or raise --distributed-timeout") from None
    try:
        return _groups(rank, world_size, tp_size, pp_size, backend, timeout)
    except Exception as exc:
        destroy_distributed()
        raise DistributedError(f"rank {rank}: building the process groups failed ({_first_line(exc)})") from None


def _wait_reachable(init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
    """Wait until rank 0's address accepts connections (torch's own store client would print a C++ stack
    on stderr when it gives up); a one-line DistributedError after `timeout_s`."""
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline or isinstance(exc, ValueError):
                raise DistributedError(f"rank {rank} of {world_size} could not join the process group at "
                                       f"{init_method} within {timeout_s:g} s (rank 0 is not there: {exc}); start "
                                       f"rank 0 first, or raise --distributed-timeout") from None
            time.sleep(0.2)


def _groups(rank: int, world_size: int, tp_size: int, pp_size: int, backend: str,
            timeout: datetime.timedelta) -> ParallelState:
    """Every rank creates every group (torch.distributed requires it), keeping its own."""
    tp_group = pp_group = None
    for p in range(pp_size):
        ranks = list(range(p * tp_size, (p + 1) * tp_size))
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            tp_group = group
    for t in range(tp_size):
        ranks = [p * tp_size + t for p in range(pp_size)]
        group = dist.new_group(ranks, timeout=timeout, backend=backend)
        if rank in ranks:
            pp_group = group
    control = dist.new_group(list(range(world_size)), timeout=_FOREVER, backend="gloo")
    cpu = None if backend == "gloo" else dist.new_group(list(range(world_size)), timeout=timeout, backend="gloo")
    hosts: list[str | None] = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=control)
    return ParallelState(rank, world_size, tp_size, pp_size, backend, tp_group, pp_group, control, cpu,
                         same_host=len(set(hosts)) == 1)


def destroy_distributed() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # a peer already gone: nothing left to tear down cleanly
            logger.debug("destroy_process_group: %s", _first_line(exc))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
