"""Virtual engines (vLLM's): several micro-batches in flight through a pipeline, so its stages do not idle.

A pipeline of S stages runs one step at a time if the driver waits for each step's logits before the next:
every stage idles while the others compute. Here the driver keeps V independent schedulers (V = S by
default), each with its own requests and its own share of the KV blocks (block ids offset into one
cache), and steps them in turn: it schedules virtual engine v and submits its batch (stage 0 computes it
while the later stages compute the batches before it), then collects the oldest batch in flight. A
virtual engine is scheduled again only once its previous batch is back (its requests need their tokens),
which, stepping in turn, is always the oldest in flight: logits come back in submission order.

A new request goes to the virtual engine with the fewest unfinished requests and stays there; each runs
at most its share of max_num_seqs (so the engine runs as many requests at once as without). One
request's decode is still sequential (each token needs the last), so batch-1 decode gains nothing from
micro-batches: only a load of several requests fills the pipeline.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from scaleinfer.attention.patterns import AttentionPattern
from scaleinfer.config import CacheConfig, SchedulerConfig
from scaleinfer.errors import ConfigError
from scaleinfer.request import FinishReason, Request
from scaleinfer.runner.forward_batch import batch_from_inputs, step_inputs
from scaleinfer.scheduler import Scheduler, SchedulerOutput


class VirtualEngines:
    """`count` schedulers over `num_blocks` KV blocks, stepped in turn through a pipeline executor
    (distributed/pipeline.py: submit / collect / runner.sample). Offers the Scheduler surface the engine
    uses (add / finish a request, counts, the block manager of probes) besides `step`."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 attention_patterns: Sequence[AttentionPattern], count: int) -> None:
        self.blocks_each = num_blocks // count
        if self.blocks_each < 1:
            raise ConfigError(f"{num_blocks} KV blocks cannot be shared by {count} micro-batches; raise "
                              f"--kv-cache-memory")
        share = replace(scheduler_config, max_num_seqs=-(-scheduler_config.max_num_seqs // count))
        self.schedulers = [Scheduler(share, cache_config, self.blocks_each, attention_patterns) for _ in range(count)]
        self.offsets = [v * self.blocks_each for v in range(count)]
        self.kv_patterns = self.schedulers[0].kv_patterns
        self.owner: dict[str, int] = {}
        self.in_flight: deque[tuple[int, SchedulerOutput, object]] = deque()
        self.ready: list[tuple[SchedulerOutput, list[Request]]] = []
        self.turn = 0
        self.max_in_flight = 0
        """The most batches that were in flight at once (the pipeline filled)."""

    # ---- the Scheduler surface ---------------------------------------------------------------
    @property
    def block_manager(self):
        """The first virtual engine's blocks (offset 0): where compute_logits / score_stream probes go."""
        return self.schedulers[0].block_manager

    def add_request(self, request: Request) -> None:
        v = min(range(len(self.schedulers)), key=lambda i: len(self.schedulers[i].requests))
        self.owner[request.request_id] = v
        self.schedulers[v].add_request(request)

    def finish_request(self, request_id: str, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        v = self.owner.pop(request_id, None)
        if v is not None:
            self.schedulers[v].finish_request(request_id, reason, stop_reason)

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.schedulers)

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.schedulers)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.schedulers)

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.schedulers)

    # ---- stepping ------------------------------------------------------------------------------
    def step(self, executor) -> list[tuple[SchedulerOutput, list[Request]]]:
        """Schedule and submit the next virtual engine's batch; collect what must be collected first.
        Returns each completed step's (SchedulerOutput, requests that got a token)."""
        done, self.ready = self.ready, []
        v = self.turn
        self.turn = (v + 1) % len(self.schedulers)
        if any(owner == v for owner, _, _ in self.in_flight):
            done.append(self._collect_oldest(executor))
        sched = self.schedulers[v].schedule()
        if not sched.is_empty:
            inputs, sample_requests = step_inputs(sched)
            inputs.tables = [[b + self.offsets[v] for b in table] for table in inputs.tables]
            batch = batch_from_inputs(inputs, executor.runner.block_size, executor.runner.patterns, sample_requests)
            self.in_flight.append((v, sched, executor.submit(batch)))
            self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        elif not done and self.in_flight:
            done.append(self._collect_oldest(executor))
        return done

    def _collect_oldest(self, executor) -> tuple[SchedulerOutput, list[Request]]:
        v, sched, flight = self.in_flight.popleft()
        model_out = executor.runner.sample(flight.batch, executor.collect(flight))
        touched = self.schedulers[v].update(sched, model_out)
        for req in sched.requests:
            if req.is_finished:
                self.owner.pop(req.request_id, None)
        return sched, touched

    def drain(self, executor) -> None:
        """Collect every batch in flight (before a probe or shutdown); their results come with the next step."""
        while self.in_flight:
            self.ready.append(self._collect_oldest(executor))
