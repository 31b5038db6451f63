"""How many tokens to propose: acceptance measured per request, step cost measured per batch shape.

With per-token acceptance a (a draft survives with probability a, independently), checking k drafts
yields E(k) = (1 - a^(k + 1)) / (1 - a) tokens per step (Leviathan et al. 2023, eq. 1). A step of a batch
of B requests that checks k drafts for each of its S speculating requests runs B + S k query rows; its
time T(B + S k) is measured (decode-only steps, an average per row count) or, until measured, taken
from a prior line T(r) = T(B) (1 + ROW_COST (r - B) / B) fitted to a 1.5B model's w4a8 decode kernels
(5 rows ~ 2.3x one row on 2 cores). A draft model adds k draft forwards of measured time. k is the
value of 0..K with the most tokens per second; 0 (no speculation) when nothing beats plain decoding by
MIN_GAIN. A request whose k fell to 0 probes k = 1 every PROBE_EVERY steps, so a text that turns
repetitive is noticed. Above `disable_by_batch_size` running requests nobody speculates.

Also the counters behind /metrics and the bench: drafts proposed, accepted, steps that verified.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROW_COST = 0.35
"""Prior extra cost of one more query row, as a fraction of a batch-1 decode step (until measured)."""
MIN_GAIN = 1.05
"""Speculate only when the expected tokens per second beat plain decoding by this factor."""
PROBE_EVERY = 16
"""Steps after which a request that stopped speculating tries k = 1 again."""
PRIOR_ACCEPT, PRIOR_WEIGHT = 0.6, 2.0
"""A new request's acceptance estimate: PRIOR_ACCEPT, worth PRIOR_WEIGHT observed drafts."""
DECAY = 0.9
"""Weight of a request's older observations per step (its text changes; recent acceptance counts more)."""
_EMA = 0.2


@dataclass
class SpecStats:
    """Counters since the engine started (vLLM's spec_decode metrics)."""

    num_steps_verified: int = 0
    """(request, step) pairs that checked drafts."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0
    """Tokens that verified steps produced: accepted drafts plus the target's own token."""
    accepted_per_position: list[int] = field(default_factory=list)
    """How often draft position j was accepted."""

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verified step (accepted drafts + 1): the speed-up bound of a free proposer."""
        return self.num_emitted_tokens / self.num_steps_verified if self.num_steps_verified else 0.0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_steps_verified += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_accepted + 1
        while len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position.append(0)
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1


@dataclass
class _RequestState:
    accepted: float = PRIOR_ACCEPT * PRIOR_WEIGHT
    trials: float = PRIOR_WEIGHT
    idle_steps: int = 0

    @property
    def acceptance(self) -> float:
        return min(self.accepted / self.trials, 0.999)


def expected_tokens(acceptance: float, k: int) -> float:
    """E(k): tokens a step that checks k drafts yields at per-token acceptance `acceptance`."""
    return float(k + 1) if acceptance >= 1.0 else (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True, disable_by_batch_size: int | None = None,
                 uses_draft_model: bool = False):
        self.max_k, self.adaptive = max_k, adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.uses_draft_model = uses_draft_model
        self.stats = SpecStats()
        self._requests: dict[str, _RequestState] = {}
        self._step_time: dict[int, float] = {}
        """EMA seconds of a decode-only target step by its number of query rows."""
        self._draft_time: float | None = None
        """EMA seconds of one draft forward (a batched draft step)."""

    # ---- choosing k ----------------------------------------------------------------------------
    def choose_k(self, request_ids: list[str], batch_size: int) -> dict[str, int]:
        """k per speculating candidate of a step whose batch runs `batch_size` requests."""
        if not request_ids or (self.disable_by_batch_size is not None and batch_size > self.disable_by_batch_size):
            return {r: 0 for r in request_ids}
        states = [self._requests.setdefault(r, _RequestState()) for r in request_ids]
        if not self.adaptive:
            return {r: self.max_k for r in request_ids}
        k = self._best_k([s.acceptance for s in states], batch_size)
        out = {}
        for r, s in zip(request_ids, states):
            if k == 0:
                s.idle_steps += 1
                out[r] = 1 if s.idle_steps % PROBE_EVERY == 0 else 0
            else:
                out[r] = k
        return out

    def _best_k(self, acceptances: list[float], batch: int) -> int:
        base = self._time(batch)
        best_k, best = 0, MIN_GAIN
        plain = batch - len(acceptances)
        for k in range(1, self.max_k + 1):
            tokens = plain + sum(expected_tokens(a, k) for a in acceptances)
            seconds = self._time(batch + len(acceptances) * k)
            if self.uses_draft_model:
                seconds += (k + 1) * (self._draft_time if self._draft_time is not None else 0.4 * base)
            gain = (tokens / seconds) / (batch / base)
            if gain > best:
                best_k, best = k, gain
        return best_k

    def _time(self, rows: int) -> float:
        """Measured (or prior) seconds of a decode-only step of `rows` query rows."""
        if rows in self._step_time:
            return self._step_time[rows]
        known = sorted(self._step_time)
        one = self._step_time[known[0]] / (1 + ROW_COST * (known[0] - 1)) if known else 1.0
        return one * (1 + ROW_COST * (rows - 1))

    # ---- observations --------------------------------------------------------------------------
    def observe_step(self, num_rows: int, seconds: float, decode_only: bool) -> None:
        if decode_only and num_rows > 0:
            old = self._step_time.get(num_rows)
            self._step_time[num_rows] = seconds if old is None else old + _EMA * (seconds - old)

    def observe_draft(self, seconds_per_forward: float) -> None:
        old = self._draft_time
        self._draft_time = seconds_per_forward if old is None else old + _EMA * (seconds_per_forward - old)

    def observe_verified(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.stats.record(num_drafts, num_accepted)
        s = self._requests.setdefault(request_id, _RequestState())
        s.accepted = s.accepted * DECAY + num_accepted
        s.trials = s.trials * DECAY + num_accepted + (1 if num_accepted < num_drafts else 0)
        s.idle_steps = 0

    def forget(self, live_request_ids: set[str]) -> None:
        """Drop the state of requests that ended."""
        for r in [r for r in self._requests if r not in live_request_ids]:
            del self._requests[r]
