"""The executor: how the engine runs a scheduled step, in this process or over several ranks.

    LLMEngine.step: SchedulerOutput -> executor.execute -> ModelOutput
    LLMEngine.compute_logits / score_stream -> executor.compute_logits -> logits

UniProcExecutor: the ModelRunner in this process (the default: one call, nothing added).
MultiprocExecutor: this process is rank 0, the driver. It keeps the one scheduler and the sampler and
holds a shard of the model and KV cache itself; each step it broadcasts the step's inputs (StepInputs:
one int64 tensor of lengths, block tables and token ids, never a pickled object graph) to the other
ranks (worker.py), then runs its shard; the shards meet in the layers' collectives and the logits are
gathered on the driver. A rank that dies or stops answering makes the step raise a one-line
DistributedError (within the distributed timeout); the executor then stops every rank it started and
refuses further steps.
"""
from __future__ import annotations

import atexit
import logging
import time
from typing import Protocol

import torch

from scaleinfer.distributed.parallel_state import ParallelState, destroy_distributed
from scaleinfer.errors import DistributedError, EngineDeadError
from scaleinfer.runner.forward_batch import build_forward_batch
from scaleinfer.runner.model_runner import ModelRunner
from scaleinfer.scheduler import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)

OP_STOP, OP_FORWARD = 0, 1
"""The first int of a step message: stop serving, or run the forward pass the message describes."""


class Executor(Protocol):
    runner: ModelRunner
    """This process's runner (the driver's shard under tensor parallelism)."""

    def execute(self, sched: SchedulerOutput) -> ModelOutput: ...

    def compute_logits(self, token_ids: list[int], block_ids: list[int] | None = None, num_cached: int = 0,
                       rows: torch.Tensor | None = None) -> torch.Tensor: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """The whole model in this process."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        return self.runner.execute(sched)

    def compute_logits(self, token_ids, block_ids=None, num_cached=0, rows=None) -> torch.Tensor:
        return self.runner.compute_logits(token_ids, block_ids, num_cached, rows)

    def shutdown(self) -> None:
        pass


class MultiprocExecutor:
    """Rank 0 of a tensor-parallel group: broadcasts each step, runs its shard, samples.

    `processes`: the worker processes this driver spawned (multiprocessing.Process), stopped at
    shutdown; empty when the ranks were started by torchrun or by hand."""

    kind = "tensor-parallel"
    """What the ranks are, in errors."""

    def __init__(self, runner: ModelRunner, comm, state: ParallelState, processes: list | None = None):
        self.runner, self.comm, self.state = runner, comm, state
        self.processes = list(processes or [])
        self.dead: str | None = None
        self.closed = False
        self.broadcast_seconds = 0.0
        """Time spent sending step messages (the executor's own overhead per step, measured)."""
        atexit.register(self.shutdown)   # the workers stop cleanly when the driver's program ends

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        batch = build_forward_batch(sched, self.runner.block_size, self.runner.patterns)
        self._send(batch.inputs.encode(OP_FORWARD))
        try:
            return self.runner.execute_batch(batch)
        except RuntimeError as exc:   # gloo's errors and the shared-memory communicator's
            raise self._failed(exc) from None

    def compute_logits(self, token_ids, block_ids=None, num_cached=0, rows=None) -> torch.Tensor:
        inputs = self.runner.logits_inputs(token_ids, block_ids, num_cached, rows)
        self._send(inputs.encode(OP_FORWARD))
        try:
            return self.runner.forward_inputs(inputs)
        except RuntimeError as exc:
            raise self._failed(exc) from None

    def _send(self, msg: torch.Tensor) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the distributed engine stopped earlier ({self.dead}); start it again")
        start = time.perf_counter()
        try:
            self.comm.broadcast_ints(msg)
        except RuntimeError as exc:
            raise self._failed(exc) from None
        self.broadcast_seconds += time.perf_counter() - start

    def _failed(self, exc: BaseException) -> DistributedError:
        """Stop every rank this driver started; the one-line error to raise."""
        reason = _first_line(exc)
        exited = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                  for r, p in enumerate(self.processes, start=1) if p.exitcode is not None]
        if exited:
            reason = "; ".join(exited)
        self.dead = reason
        logger.debug("distributed step failed", exc_info=exc)
        self._stop_processes()
        return DistributedError(f"a {self.kind} rank failed during a step ({reason}); the engine stopped, "
                                f"start it again")

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them briefly, then end any that remain (once)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.shutdown)
        if self.dead is None:
            self.dead = "shut down"
            try:
                self.comm.broadcast_ints(torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.long))
            except RuntimeError as exc:
                logger.debug("stop message not delivered: %s", _first_line(exc))
        for p in self.processes:
            p.join(timeout=10)
        self._stop_processes()
        self.comm.close()
        destroy_distributed()

    def _stop_processes(self) -> None:
        self.comm.abort()   # shared memory: wake any rank still waiting in it
        for p in self.processes:
            if p.is_alive():
                p.kill()
        for p in self.processes:
            p.join(timeout=5)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
