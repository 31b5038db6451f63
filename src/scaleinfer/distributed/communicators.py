"""The collectives of a tensor-parallel group: all-reduce (sum), gather of logits shards to rank 0, and the
broadcast of each step's inputs from rank 0.

Two implementations of one protocol: ShmCommunicator, the ranks of one host through a shared-memory
segment (kernels/csrc/shm_comm.cpp: a copy and a flag, microseconds), and TorchCommunicator,
torch.distributed (gloo across hosts or wherever shared memory is not available, NCCL on GPUs).
`make_communicator` picks one. A dead or silent peer raises RuntimeError within the timeout (the
executor turns it into a one-line error).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Protocol

import torch
import torch.distributed as dist

from scaleinfer.distributed.parallel_state import ParallelState
from scaleinfer.errors import ConfigError
from scaleinfer.kernels import cpu_kernels

logger = logging.getLogger(__name__)

SHM_SLOT_BYTES = 4 << 20
"""Bytes of one rank's slot in the shared segment (x 2 x ranks in all); bigger tensors go in rounds."""


class Communicator(Protocol):
    rank: int
    world_size: int
    name: str

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor: ...   # in place, identical on every rank

    def gather_last(self, t: torch.Tensor) -> torch.Tensor | None: ...  # rank 0: shards side by side

    def broadcast_ints(self, t: torch.Tensor | None, wait_forever: bool = False) -> torch.Tensor: ...

    def reducer(self) -> object: ...   # what the C++ decode program calls after o and down

    def abort(self) -> None: ...     # make every rank's pending wait fail now (a peer is gone)

    def stats(self) -> tuple[float, int]: ...   # (seconds inside collectives, their count) since reset

    def reset_stats(self) -> None: ...

    def close(self) -> None: ...


def _cat_last(stacked: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[world, numel] of equal shards of `shape` -> the shards side by side along the last dimension."""
    world = stacked.shape[0]
    return stacked.view(world, -1, shape[-1]).permute(1, 0, 2).reshape(*shape[:-1], world * shape[-1])


class TorchCommunicator:
    """Collectives of torch.distributed over `group` (gloo on the CPU, NCCL on GPUs)."""

    def __init__(self, state: ParallelState, group, ranks: list[int]):
        self.group, self.ranks = group, ranks
        self.seconds, self.calls = 0.0, 0
        self.rank, self.world_size = ranks.index(state.rank), len(ranks)
        self.control = state.control_group
        self.name = state.backend

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        dist.all_reduce(t, group=self.group)
        self._count(start)
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor | None:
        start = time.perf_counter()
        t = t.contiguous()
        if self.rank != 0:
            dist.gather(t, None, dst=self.ranks[0], group=self.group)
            self._count(start)
            return None
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.gather(t, parts, dst=self.ranks[0], group=self.group)
        self._count(start)
        return torch.cat(parts, dim=-1)

    def _count(self, start: float) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def stats(self) -> tuple[float, int]:
        return self.seconds, self.calls

    def reset_stats(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def broadcast_ints(self, t: torch.Tensor | None, wait_forever: bool = False) -> torch.Tensor:
        """A 1-D int64 tensor from rank 0: its length, then its values, over the group without a timeout
        (a worker waits idle between requests for as long as it takes; a dead peer still ends the wait,
        gloo sees its connection close)."""
        group = self.control
        size = torch.tensor([0 if t is None else t.numel()], dtype=torch.long)
        dist.broadcast(size, src=self.ranks[0], group=group)
        if self.rank != 0:
            t = torch.empty(int(size), dtype=torch.long)
        dist.broadcast(t, src=self.ranks[0], group=group)
        return t

    def reducer(self):
        return self.all_reduce_

    def abort(self) -> None:
        pass   # gloo ends a collective whose peer is gone by itself

    def close(self) -> None:
        pass


class ShmCommunicator:
    """The ranks of one host through one shared-memory segment (csrc/shm_comm.cpp)."""

    name = "shm"

    def __init__(self, state: ParallelState, group, ranks: list[int], timeout_s: float):
        ops = cpu_kernels()
        if ops is None or not hasattr(ops, "ShmComm"):
            raise ConfigError("the shared-memory communicator needs the C++ kernels; use --distributed-communicator gloo")
        self.rank, self.world_size, self.timeout_s = ranks.index(state.rank), len(ranks), timeout_s
        names = [f"/scaleinfer-{uuid.uuid4().hex[:16]}"]
        dist.broadcast_object_list(names, src=ranks[0], group=group)
        if self.rank == 0:
            self.native = ops.ShmComm(names[0], 0, self.world_size, SHM_SLOT_BYTES, True, timeout_s)
        dist.barrier(group=group)
        if self.rank != 0:
            self.native = ops.ShmComm(names[0], self.rank, self.world_size, SHM_SLOT_BYTES, False, timeout_s)
        self.native.barrier()
        if self.rank == 0:
            self.native.unlink()   # every rank has it mapped: the name is no longer needed (nothing leaks)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous() and t.dtype == torch.float32:
            return self.native.all_reduce_(t)
        return t.copy_(self.native.all_reduce_(t.float().contiguous()))

    def gather_last(self, t: torch.Tensor) -> torch.Tensor | None:
        stacked = self.native.gather(t.float().contiguous().view(-1))
        return _cat_last(stacked, t.shape) if self.rank == 0 else None

    def broadcast_ints(self, t: torch.Tensor | None, wait_forever: bool = False) -> torch.Tensor:
        send = t.contiguous() if t is not None else torch.empty(0, dtype=torch.long)
        return self.native.broadcast(send, -1.0 if wait_forever else self.timeout_s)

    def reducer(self):
        return self.native

    def abort(self) -> None:
        self.native.abort()

    def stats(self) -> tuple[float, int]:
        return self.native.stats()

    def reset_stats(self) -> None:
        self.native.reset_stats()

    def close(self) -> None:
        pass


def make_communicator(state: ParallelState, kind: str, timeout_s: float, device: str = "cpu") -> Communicator:
    """The tensor-parallel group's communicator: `kind` shm, gloo or auto (shm on one host with the
    kernels built, NCCL on GPUs, else gloo)."""
    group, ranks = state.tp_group, state.tp_ranks
    if device.startswith("cuda"):
        return TorchCommunicator(state, group, ranks)
    shm_possible = state.same_host and cpu_kernels() is not None and hasattr(cpu_kernels(), "ShmComm")
    if kind == "shm" and not state.same_host:
        raise ConfigError("--distributed-communicator shm needs every rank on one host; use gloo or auto")
    if kind == "shm" or (kind == "auto" and shm_possible):
        return ShmCommunicator(state, group, ranks, timeout_s)
    return TorchCommunicator(state, group, ranks)
