"""Per-request state that flows through the pipeline, and the outputs handed back to users.

Request is owned by the engine and mutated only by the Scheduler (num_computed_tokens, block_ids,
status, output_token_ids). RequestOutput / CompletionOutput are what LLM.generate() returns.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from scaleinfer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"      # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"    # cancelled by the client
    ERROR = "error"    # cannot go on: a structured-output grammar reached a dead end (stop_reason says so)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    encoder_input: object | None = None
    """Encoder-decoder models (models/encoder_decoder.py): what the encoder reads (a tensor: Whisper's
    log-mel features, T5's source ids); None for decoder-only models. Kept for a recompute after preemption."""
    num_encoder_tokens: int = 0
    """Encoder states of the request (its cross-attention keys); 0 for decoder-only models."""
    encoder_group: str | None = None
    """Requests with the same group and the same encoder_input object (the children of one n > 1 request)
    share one encoder run: the first admitted runs it, the others take its cross blocks by reference."""
    keep_encoder_output: bool = False
    """Keep the cross blocks after the request finishes, for a later request with the same encoder_input
    object (Whisper's temperature fallback decodes a window again): scheduler.py, KeptEncoderOutputs."""

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens of all_token_ids whose K/V are in the cache."""
    block_ids: list[int] = field(default_factory=list)
    cross_block_ids: list[int] = field(default_factory=list)
    """Blocks holding the cross-attention K/V of encoder positions 0 .. num_encoder_tokens - 1 (empty:
    the encoder has not run since admission)."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache."""
    first_token_time: float | None = None
    finish_time: float | None = None
    # Logprobs of each output token: (sampled_logprob, {token_id: logprob} for the top-N).
    output_logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    grammar: object | None = None
    """structured.GrammarState of a request with structured outputs (set by the engine), else None."""
    beam_candidates: int = 0
    """Beam search: the runner reports this many top (token, logprob) pairs in `candidates` instead of
    appending a sampled token; the engine's beam group then extends or forks the beam (0 = sample)."""
    candidates: tuple[list[int], list[float]] | None = None
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed for the next step (speculative decoding); set by the engine's proposer."""
    spec_draft_probs: object = None
    """The draft model's probabilities of spec_token_ids ([k, vocab] tensor) for the rejection sampler;
    None: the drafts are fixed guesses (n-gram, or greedy drafting)."""
    _all_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def fork(self, request_id: str) -> "Request":
        """A new beam with this request's tokens and progress (no blocks: BlockManager.fork shares them)."""
        child = Request(request_id, self.prompt_token_ids, self.sampling_params, self.eos_token_ids,
                        arrival_time=self.arrival_time, prompt=self.prompt, encoder_input=self.encoder_input,
                        num_encoder_tokens=self.num_encoder_tokens, encoder_group=self.encoder_group,
                        keep_encoder_output=self.keep_encoder_output, output_token_ids=list(self.output_token_ids),
                        num_computed_tokens=self.num_computed_tokens, beam_candidates=self.beam_candidates)
        child._all_token_ids = list(self._all_token_ids)
        child.first_token_time = self.first_token_time
        return child
    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first `num_output_tokens` outputs (a stop string ended the text inside a run of
        accepted draft tokens: what follows it is dropped, as without speculation)."""
        drop = self.num_output_tokens - num_output_tokens
        if drop > 0:
            del self.output_token_ids[num_output_tokens:]
            del self._all_token_ids[len(self._all_token_ids) - drop:]
            del self.output_logprobs[num_output_tokens:]

    def append_output_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, seconds."""
        if self.finish_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    """Per output token: {token_id: logprob} of the top-N plus the sampled token."""
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class BeamSearchSequence:
    """vLLM's shape: one sequence of LLM.beam_search, prompt included in `tokens` and `text`."""

    tokens: list[int]
    cum_logprob: float
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class BeamSearchOutput:
    """vLLM's shape: the beams of one prompt of LLM.beam_search, best first."""

    sequences: list[BeamSearchSequence]
