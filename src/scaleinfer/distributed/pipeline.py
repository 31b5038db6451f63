"""Pipeline parallelism at run time: the links between stages, the driver's executor and the stage loop.

Ranks are vLLM's (rank = pp_rank * tp_size + tp_rank): a stage is a tensor-parallel group, and rank t of
stage s talks to rank t of stages s - 1 and s + 1 (its pipeline chain). Per step, along each chain:

    step message  the StepInputs as one int64 tensor (size first), relayed stage to stage before each
                  computes, on a gloo group without a timeout (a stage waits idle between requests)
    stream        the residual stream x + residual after the stage's layers, [tokens, hidden], on the
                  chain's group (the distributed timeout bounds every wait)
    logits        from the last stage's first rank to the driver (rank 0): [rows, vocab] float32

The driver (rank 0, stage 0) schedules, runs stage 0 and samples; `submit` sends a step on and returns
while the later stages compute, `collect` receives its logits, so several steps (micro-batches) can be
in flight (engine/pipelined.py keeps one per virtual engine). Within a stage the step message reaches
the other tensor-parallel ranks through the group's communicator, as under tensor parallelism alone.
"""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from scaleinfer.distributed.executor import OP_FORWARD, OP_STOP, MultiprocExecutor, _first_line
from scaleinfer.distributed.parallel_state import ParallelState
from scaleinfer.distributed.stages import PPStage
from scaleinfer.errors import DistributedError, EngineDeadError
from scaleinfer.runner.forward_batch import ForwardBatch, StepInputs, batch_from_inputs, build_forward_batch
from scaleinfer.runner.model_runner import ModelRunner
from scaleinfer.scheduler import ModelOutput, SchedulerOutput

logger = logging.getLogger(__name__)

TAG_STREAM, TAG_LOGITS = 1, 2
SENDS_PER_STEP = 3
"""The most sends one rank makes per step: the step message's size and body, and the stream or logits."""
OP_STATS = 2
"""A step message that asks every rank for its busy time since the last one (bench/pipeline measurements)."""
_FOREVER = datetime.timedelta(days=365)


@dataclass
class PipeLinks:
    """This rank's place in its pipeline chain and the groups its messages travel on."""

    stage: PPStage
    prev: int | None
    """Global rank this rank receives from (None on the first stage)."""
    next: int | None
    """Global rank this rank sends to (None on the last stage)."""
    steps: object
    """The chain's gloo group without a timeout (step messages)."""
    data: object
    """The chain's group with the distributed timeout (streams, logits)."""
    sends_logits: bool
    """Whether this rank sends the logits to the driver (the last stage's first tensor-parallel rank)."""
    steps_in_flight: int = 1
    """The most steps the driver has in flight (its micro-batches): a send that many steps old is received."""
    pending: list = field(default_factory=list)
    """(work, tensor) of sends not yet known to be complete (the tensors must live until then)."""

    def isend(self, t: torch.Tensor, dst: int, group, tag: int = 0) -> None:
        """Send without waiting. A gloo send never reports itself complete until waited on, so the sends
        older than the steps in flight (received by now: their steps' logits came back) are waited on, in
        order; without that every stream and logits tensor ever sent stayed alive (a last stage of
        Qwen2.5-1.5B grew 3 GB in minutes of a 32-request load)."""
        self.pending.append((dist.isend(t, dst, group=group, tag=tag), t))
        self.pending = [(w, x) for w, x in self.pending if not w.is_completed()]
        keep = SENDS_PER_STEP * (self.steps_in_flight + 2)   # >= steps_in_flight + 2 steps of sends
        while len(self.pending) > keep:
            self.pending.pop(0)[0].wait()

    def send_step(self, msg: torch.Tensor) -> None:
        if self.next is not None:
            self.isend(torch.tensor([msg.numel()], dtype=torch.long), self.next, self.steps)
            self.isend(msg, self.next, self.steps)

    def recv_step(self) -> torch.Tensor:
        size = torch.empty(1, dtype=torch.long)
        dist.recv(size, self.prev, group=self.steps)
        msg = torch.empty(int(size), dtype=torch.long)
        dist.recv(msg, self.prev, group=self.steps)
        return msg

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def pipeline_links(state: ParallelState, stage: PPStage,
                   steps_in_flight: int = 1) -> tuple[PipeLinks, ParallelState]:
    """Create the groups every rank must create (in the same order) and this rank's links; also the
    state whose control group is this rank's stage only (the communicator's step broadcast).
    `steps_in_flight`: the driver's micro-batches (every rank must be given the same)."""
    tp, pp = state.tp_size, state.pp_size
    steps = stage_control = None
    for t in range(tp):
        group = dist.new_group([p * tp + t for p in range(pp)], timeout=_FOREVER, backend="gloo")
        steps = group if t == state.tp_rank else steps
    for p in range(pp):
        group = dist.new_group(list(range(p * tp, (p + 1) * tp)), timeout=_FOREVER, backend="gloo")
        stage_control = group if p == state.pp_rank else stage_control
    prev = None if stage.first else state.rank - tp
    nxt = None if stage.last else state.rank + tp
    links = PipeLinks(stage, prev, nxt, steps, state.pp_group, stage.last and state.tp_rank == 0, steps_in_flight)
    return links, replace(state, control_group=stage_control)


class LocalComm:
    """The communicator of a stage of one rank: nothing to reduce, gather or broadcast."""

    name = "none"
    rank, world_size = 0, 1

    def all_reduce_(self, t):
        return t

    def gather_last(self, t):
        return t

    def broadcast_ints(self, t, wait_forever: bool = False):
        return t

    def reducer(self):
        return None

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class InFlight:
    """A step sent down the pipeline whose logits have not come back yet."""

    batch: ForwardBatch
    started: float


class PipelineExecutor(MultiprocExecutor):
    """Rank 0 of a pipeline: stage 0's shard, the step messages, the logits back, sampling."""

    kind = "pipeline"

    def __init__(self, runner: ModelRunner, comm, state: ParallelState, links: PipeLinks, vocab_size: int,
                 hidden_size: int, processes: list | None = None):
        super().__init__(runner, comm, state, processes)
        self.links, self.vocab_size, self.hidden_size = links, vocab_size, hidden_size
        self.last_rank = (state.pp_size - 1) * state.tp_size
        self.stage_seconds = 0.0
        """Time rank 0 spent computing its stage (the rest of a step it waits: the bubble, measured)."""
        self.wait_seconds = 0.0
        """Time rank 0 spent waiting for logits."""

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        batch = build_forward_batch(sched, self.runner.block_size, self.runner.patterns)
        return self.runner.sample(batch, self.collect(self.submit(batch)))

    def compute_logits(self, token_ids, block_ids=None, num_cached=0, rows=None) -> torch.Tensor:
        inputs = self.runner.logits_inputs(token_ids, block_ids, num_cached, rows)
        return self.collect(self.submit(batch_from_inputs(inputs, self.runner.block_size, self.runner.patterns)))

    def submit(self, batch: ForwardBatch) -> InFlight:
        """Send the step on and run stage 0 of it; returns at once after (the other stages go on)."""
        self._send(batch.inputs.encode(OP_FORWARD))
        start = time.perf_counter()
        try:
            stream = self.runner.forward_stage(batch, None, last=False)
            self.links.isend(stream, self.links.next, self.links.data, TAG_STREAM)
        except RuntimeError as exc:
            raise self._failed(exc) from None
        self.stage_seconds += time.perf_counter() - start
        return InFlight(batch, start)

    def collect(self, flight: InFlight) -> torch.Tensor:
        """The logits of a submitted step (steps are collected in the order they were submitted)."""
        if self.dead is not None:
            raise EngineDeadError(f"the distributed engine stopped earlier ({self.dead}); start it again")
        logits = torch.empty(len(flight.batch.inputs.logits_indices), self.vocab_size, device=self.runner.device)
        start = time.perf_counter()
        try:
            dist.recv(logits, self.last_rank, group=self.links.data, tag=TAG_LOGITS)
        except RuntimeError as exc:
            raise self._failed(exc) from None
        self.wait_seconds += time.perf_counter() - start
        return logits

    def _send(self, msg: torch.Tensor) -> None:
        super()._send(msg)   # the other ranks of stage 0 (a dead engine raises here)
        try:
            self.links.send_step(msg)
        except RuntimeError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: BaseException) -> DistributedError:
        deadline = time.monotonic() + 2.0   # a killed rank's exit code: name it rather than gloo's text
        for p in self.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        return super()._failed(exc)

    def stage_stats(self) -> list[dict]:
        """Per rank (in rank order) the seconds it computed its stage and waited for its input since the
        last call, and its steps; rank 0 also its wait for logits. Call on an idle engine."""
        self._send(torch.tensor([OP_STATS, 0, 0, 0], dtype=torch.long))
        mine = {"rank": 0, "compute_s": self.stage_seconds, "wait_s": self.wait_seconds}
        stats: list = [None] * self.state.world_size
        dist.all_gather_object(stats, mine, group=self.state.control_group)
        self.stage_seconds = self.wait_seconds = 0.0
        return stats

    def shutdown(self) -> None:
        if self.dead is None:
            try:
                self.links.send_step(torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.long))
                self.links.drain()
            except RuntimeError as exc:
                logger.debug("stop message not delivered down the pipeline: %s", _first_line(exc))
        super().shutdown()


class StageWorker:
    """A rank other than the driver: receives each step message, relays it, runs its stage's part."""

    def __init__(self, runner: ModelRunner, comm, state: ParallelState, links: PipeLinks, hidden_size: int,
                 dtype: torch.dtype):
        self.runner, self.comm, self.state, self.links = runner, comm, state, links
        self.hidden_size, self.dtype = hidden_size, dtype
        self.steps = 0
        self.compute_seconds = self.wait_seconds = 0.0

    def serve(self) -> None:
        """Run steps until the driver says stop; a lost peer ends it with a one-line DistributedError."""
        try:
            while self._step():
                self.steps += 1
            self.links.drain()
        except RuntimeError as exc:
            raise DistributedError(f"rank {self.state.rank} (pipeline stage {self.links.stage.rank}): lost the "
                                   f"other ranks after {self.steps} steps ({_first_line(exc)})") from None

    def _step(self) -> bool:
        links = self.links
        if links.stage.first:
            msg = self.comm.broadcast_ints(None, wait_forever=True)
        else:
            msg = links.recv_step()
        links.send_step(msg)
        op, inputs = StepInputs.decode(msg)
        if op == OP_STOP:
            return False
        if op == OP_STATS:
            mine = {"rank": self.state.rank, "compute_s": self.compute_seconds, "wait_s": self.wait_seconds}
            dist.all_gather_object([None] * self.state.world_size, mine, group=self.state.control_group)
            self.compute_seconds = self.wait_seconds = 0.0
            return True
        batch = batch_from_inputs(inputs, self.runner.block_size, self.runner.patterns)
        stream = None
        if not links.stage.first:
            stream = torch.empty(len(inputs.input_ids), self.hidden_size, dtype=self.dtype, device=self.runner.device)
            start = time.perf_counter()
            dist.recv(stream, links.prev, group=links.data, tag=TAG_STREAM)
            self.wait_seconds += time.perf_counter() - start
        start = time.perf_counter()
        out = self.runner.forward_stage(batch, stream, last=links.stage.last)
        self.compute_seconds += time.perf_counter() - start
        if not links.stage.last:
            links.isend(out, links.next, links.data, TAG_STREAM)
        elif links.sends_logits:
            links.isend(out.contiguous(), 0, links.data, TAG_LOGITS)
        return True
