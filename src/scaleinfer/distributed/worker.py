"""A worker rank of a distributed engine: it owns its shard of the model and of the KV cache (a ModelRunner
built by the launcher) and runs every step the driver (rank 0) broadcasts, until told to stop.

The driver decides everything (scheduling, block tables, sampling); a worker only turns StepInputs into
its part of the forward pass, whose collectives meet the other ranks'. A pipeline stage's worker would
own a contiguous range of layers the same way (the runner it is given holds only those).
"""
from __future__ import annotations

import logging

from scaleinfer.distributed.executor import OP_STOP
from scaleinfer.errors import DistributedError
from scaleinfer.runner.forward_batch import StepInputs
from scaleinfer.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, runner: ModelRunner, comm, rank: int):
        self.runner, self.comm, self.rank = runner, comm, rank
        self.steps = 0

    def serve(self) -> None:
        """Run steps until the driver says stop; a driver that dies ends it with DistributedError."""
        while True:
            try:
                msg = self.comm.broadcast_ints(None, wait_forever=True)
                op, inputs = StepInputs.decode(msg)
                if op == OP_STOP:
                    return
                self.runner.forward_inputs(inputs)
            except RuntimeError as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                raise DistributedError(f"rank {self.rank}: lost the other ranks after {self.steps} steps "
                                       f"({lines[0][:300] if lines else type(exc).__name__})") from None
            self.steps += 1
