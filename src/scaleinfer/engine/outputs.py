"""The engine's view of a request for its caller: a parent with n child sequences (n > 1 fans one
request out into n Requests sharing the prompt) and the RequestOutput assembled from them."""
from __future__ import annotations

from dataclasses import dataclass, field

from scaleinfer.request import CompletionOutput, Request, RequestMetrics, RequestOutput
from scaleinfer.tokenizer import IncrementalDetokenizer


@dataclass
class Child:
    """One of the n sequences of a request: its Request and its detokenizer."""

    request: Request
    detokenizer: IncrementalDetokenizer
    num_detokenized: int = 0


@dataclass
class Parent:
    """A request as the caller sees it: its prompt and its n children."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Child] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.children)


def make_output(parent: Parent) -> RequestOutput:
    """The RequestOutput of a parent: one CompletionOutput per child, logprobs and metrics."""
    outputs = []
    for i, child in enumerate(parent.children):
        req = child.request
        logprobs = cumulative = None
        if req.sampling_params.logprobs is not None:
            logprobs = []
            cumulative = 0.0
            for token, (lp, top) in zip(req.output_token_ids, req.output_logprobs):
                logprobs.append({**top, token: lp})
                cumulative += lp
        outputs.append(CompletionOutput(
            index=i, text=child.detokenizer.text, token_ids=list(req.output_token_ids),
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            stop_reason=req.stop_reason, logprobs=logprobs, cumulative_logprob=cumulative))
    first = parent.children[0].request
    metrics = RequestMetrics(first.arrival_time, first.first_token_time,
                             max((c.request.finish_time or 0.0) for c in parent.children) or None,
                             len(parent.prompt_token_ids), sum(len(o.token_ids) for o in outputs))
    return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs,
                         parent.finished, metrics)
