"""Beam search: one request's live beams, the finished hypotheses, and the forks and drops of the beams'
Requests (their KV blocks shared by reference, copied on write: kv_cache/block_manager.py). Driven by
LLMEngine after each step's update.

Each live beam is a Request with `beam_candidates` set: the runner reports its top candidates (token,
log-probability of the raw logits) instead of sampling, and the beam waits until all its siblings have
theirs. Then one step of HF transformers' beam search (generation/utils.py `_beam_search`, its
defaults) runs over them:

1. every candidate scores running_sum + logprob; the best K = max(2, 1 + #stop ids) * width are kept;
2. a candidate that ends its sequence (EOS / stop id / stop string / max_tokens / the context) and
   ranks among the first `width` becomes a finished hypothesis scored sum / len(output) ** length_penalty
   (the n best are kept); the first `width` candidates that do not end continue as the next beams;
   (candidates a logits processor banned, at -inf, are never taken);
3. the search stops when no running beam can still beat the worst kept hypothesis (early_stopping
   False: the best running sum over the current length; "never" with length_penalty > 0: over the
   longest possible length), when `width` hypotheses finished (early_stopping True), or when no
   candidate continues. With a patience p (openai-whisper's), round(width * p) hypotheses are kept and
   awaited instead of `width`.

A parent chosen by one candidate is extended in place; chosen by several, it is forked (same blocks,
reference counts up); chosen by none, it is dropped (its references released).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from scaleinfer.errors import RequestError
from scaleinfer.request import CompletionOutput, FinishReason, Request, RequestMetrics, RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.tokenizer import IncrementalDetokenizer, Tokenizer


def check_beam_fits(params: SamplingParams, prompt_len: int, num_encoder_tokens: int, block_size: int,
                    num_kv_blocks: int) -> None:
    """RequestError when the beams of a request could never fit the KV cache together (each beam's prompt
    blocks, plus the shared cross blocks of an encoder-decoder)."""
    need = params.beam_width * -(-(prompt_len + 1) // block_size) + -(-num_encoder_tokens // block_size)
    if need > num_kv_blocks:
        raise RequestError(f"beam search with {params.beam_width} beams of a {prompt_len}-token prompt "
                           f"needs {need} KV blocks but the cache has {num_kv_blocks}; "
                           f"raise --kv-cache-memory or lower best_of")


@dataclass
class Hypothesis:
    token_ids: list[int]
    logprobs: list[float]
    score: float
    finish_reason: FinishReason
    stop_reason: str | int | None = None

    @property
    def cum_logprob(self) -> float:
        return sum(self.logprobs)


@dataclass
class _Beam:
    request: Request
    logprobs: list[float] = field(default_factory=list)

    @property
    def sum_logprob(self) -> float:
        return sum(self.logprobs)


class BeamGroup:
    """The beams of one request (ids `{request_id}#b{k}`), advanced one token at a time."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...], tokenizer: Tokenizer, max_model_len: int,
                 encoder_input=None, num_encoder_tokens: int = 0):
        self.request_id, self.prompt, self.prompt_ids = request_id, prompt, list(prompt_ids)
        self.params, self.tokenizer, self.max_model_len = params, tokenizer, max_model_len
        self.width = params.beam_width
        self.num_finished = max(1, round(self.width * params.patience))
        """Finished hypotheses kept, and awaited under early_stopping True (width, times the patience)."""
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.keep = max(2, 1 + len(self.stop_ids)) * self.width
        """Candidates kept per step (HF's beams_to_keep): enough that `width` of them continue."""
        self.max_output = max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            self.max_output = min(self.max_output, params.max_tokens)
        root = Request(f"{request_id}#b0", self.prompt_ids, params, eos_token_ids, prompt=prompt,
                       beam_candidates=self.keep + len(self.stop_ids), encoder_input=encoder_input,
                       num_encoder_tokens=num_encoder_tokens, encoder_group=request_id if num_encoder_tokens else None)
        self.beams = [_Beam(root)]
        self.finished: list[Hypothesis] = []
        self.improvable = True
        self.done = False
        self._next_id = 1
        self.finish_time: float | None = None
        self._arrival = root.arrival_time
        self._first_token_time: float | None = None

    @staticmethod
    def group_id(beam_request_id: str) -> str:
        return beam_request_id.rpartition("#b")[0]

    @property
    def requests(self) -> list[Request]:
        return [b.request for b in self.beams]

    def ready(self) -> bool:
        """Every live beam has its candidates: the next tokens can be chosen."""
        return bool(self.beams) and all(b.request.candidates is not None for b in self.beams)

    # ---- one step -------------------------------------------------------------------------------
    def advance(self, scheduler) -> None:
        """Choose the next beams and hypotheses from the candidates; fork / extend / drop Requests."""
        ranked = self._ranked_candidates()
        next_beams: list[tuple[int, int, float]] = []   # (parent index, token, logprob)
        for rank, (total, bi, token, lp) in enumerate(ranked):
            ended = self._ends(self.beams[bi], token)
            if ended is None:
                if len(next_beams) < self.width:
                    next_beams.append((bi, token, lp))
            elif rank < self.width:
                self._add_finished(self.beams[bi], token, lp, total, ended)
        self._update_beams(scheduler, next_beams)
        self._check_done(scheduler)

    def _ranked_candidates(self) -> list[tuple[float, int, int, float]]:
        """(running sum + logprob, beam index, token, logprob), best first, the first `keep`."""
        out = []
        for bi, beam in enumerate(self.beams):
            ids, lps = beam.request.candidates
            banned = beam.request.num_output_tokens + 1 <= self.params.min_tokens
            base = beam.sum_logprob
            out.extend((base + lp, bi, t, lp) for t, lp in zip(ids, lps)
                       if lp > -math.inf and not (banned and t in self.stop_ids))   # never a banned token
        out.sort(key=lambda c: (-c[0], c[1]))
        return out[:self.keep]

    def _ends(self, beam: _Beam, token: int) -> tuple[FinishReason, str | int | None] | None:
        """Whether appending `token` ends the beam's sequence, and why."""
        req, params = beam.request, self.params
        if token in self.stop_ids:
            return FinishReason.STOP, (token if token in params.stop_token_ids else None)
        if params.stop_strings:
            text = self.tokenizer.decode(req.output_token_ids + [token], params.skip_special_tokens)
            hit = next((s for s in params.stop_strings if s in text), None)
            if hit is not None:
                return FinishReason.STOP, hit
        if req.num_output_tokens + 1 >= self.max_output:
            return FinishReason.LENGTH, None
        return None

    def _add_finished(self, beam: _Beam, token: int, lp: float, total: float,
                      ended: tuple[FinishReason, str | int | None]) -> None:
        if not self.improvable or (self.params.early_stopping is True and len(self.finished) >= self.num_finished):
            return
        length = beam.request.num_output_tokens + 1
        score = total / (length ** self.params.length_penalty)
        self.finished.append(Hypothesis(beam.request.output_token_ids + [token], beam.logprobs + [lp], score,
                                        *ended))
        self.finished.sort(key=lambda h: -h.score)   # stable: earlier hypotheses win ties, as HF's merge
        del self.finished[self.num_finished:]

    def _update_beams(self, scheduler, next_beams: list[tuple[int, int, float]]) -> None:
        children: dict[int, list[tuple[int, float]]] = {}
        for bi, token, lp in next_beams:
            children.setdefault(bi, []).append((token, lp))
        new_beams: list[_Beam] = []
        for bi, beam in enumerate(self.beams):
            parent = beam.request
            parent.candidates = None
            picks = children.get(bi, [])
            forks = []
            for token, lp in picks[1:]:   # forks first: they copy the parent before it grows
                child = parent.fork(f"{self.request_id}#b{self._next_id}")
                self._next_id += 1
                scheduler.add_fork(parent, child)
                child.append_output_token(token)
                forks.append(_Beam(child, beam.logprobs + [lp]))
            if picks:
                parent.append_output_token(picks[0][0])
                beam.logprobs.append(picks[0][1])
                new_beams.append(beam)
            else:
                scheduler.finish_request(parent.request_id, FinishReason.ABORT)
            new_beams.extend(forks)
        self.beams = new_beams
        if self._first_token_time is None:
            self._first_token_time = time.monotonic()

    def _check_done(self, scheduler) -> None:
        if self.improvable and len(self.finished) >= self.num_finished and self.beams:
            length = self.beams[0].request.num_output_tokens
            if self.params.early_stopping == "never" and self.params.length_penalty > 0.0:
                length = self.max_output
            best_running = max(b.sum_logprob for b in self.beams) / (length ** self.params.length_penalty)
            self.improvable = best_running > self.finished[-1].score
        if not self.improvable or not self.beams or (
                self.params.early_stopping is True and len(self.finished) >= self.num_finished):
            self.finish(scheduler)

    def finish(self, scheduler) -> None:
        """End the search: release every live beam."""
        for beam in self.beams:
            scheduler.finish_request(beam.request.request_id, FinishReason.ABORT)
        self.done = True
        self.finish_time = time.monotonic()

    # ---- output ---------------------------------------------------------------------------------
    def output(self) -> RequestOutput:
        """The n best hypotheses, best first (live beams fill in if fewer finished, e.g. on abort)."""
        params = self.params
        hyps = list(self.finished)
        if len(hyps) < params.n:
            live = sorted(self.beams, key=lambda b: -b.sum_logprob)
            hyps += [Hypothesis(list(b.request.output_token_ids), list(b.logprobs), b.sum_logprob,
                                FinishReason.ABORT) for b in live]
        outputs = []
        for i, hyp in enumerate(hyps[:params.n]):
            detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, params.skip_special_tokens,
                                           params.stop_strings, params.include_stop_str_in_output)
            detok.add_tokens(hyp.token_ids)
            detok.flush()
            logprobs = None
            if params.logprobs is not None:
                logprobs = [{t: lp} for t, lp in zip(hyp.token_ids, hyp.logprobs)]
            outputs.append(CompletionOutput(i, detok.text, list(hyp.token_ids), hyp.finish_reason.value,
                                            hyp.stop_reason, logprobs, hyp.cum_logprob))
        metrics = RequestMetrics(self._arrival, self._first_token_time, self.finish_time,
                                 len(self.prompt_ids), sum(len(o.token_ids) for o in outputs))
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outputs, self.done, metrics)
