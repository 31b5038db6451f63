"""`scaleinfer eval perplexity`: the quality gate for compression modes.

Convention (data/README.md): tokenize the whole file with the model's tokenizer (a BOS is
put in front of each window only when the model requires one, and is never scored), cut the ids
into non-overlapping windows of `window` tokens, run each window through the engine's model and paged
KV cache (`ModelRunner.compute_logits`), and report exp(mean negative log-likelihood) over every
predicted token (window length - 1 per window).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class PerplexityResult:
    perplexity: float
    num_tokens: int
    """Tokens predicted (and scored)."""
    num_windows: int
    window: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def windows_of(ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows; a final partial window is kept if it has at least 2 tokens."""
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    out = [w for w in out if len(w) >= 2]
    return out[:max_windows] if max_windows else out


def perplexity(llm, text: str, window: int = 512, max_windows: int | None = None,
               step: int | None = None) -> PerplexityResult:
    """`step`: feed each window `step` tokens per forward pass through the paged cache (1 = the decode
    path, one token at a time); None: each window in one pass (the prefill path)."""
    tok = llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
    executor = llm.engine.executor   # every rank of a tensor-parallel engine runs the pass
    total_nll, total_tokens = 0.0, 0
    chunks = windows_of(ids, window, max_windows)
    start = time.perf_counter()
    for chunk in chunks:
        seq = bos + chunk
        if step:
            total_nll -= float(llm.engine.score_stream(seq, chunk=step)[len(bos):].sum())
        else:
            logits = executor.compute_logits(seq)                    # [len(seq), vocab]
            logprobs = torch.log_softmax(logits[len(bos):-1].float(), dim=-1)
            targets = torch.tensor(chunk[1:], device=logprobs.device)
            total_nll -= float(logprobs.gather(1, targets.unsqueeze(1)).sum())
        total_tokens += len(chunk) - 1
    elapsed = time.perf_counter() - start
    return PerplexityResult(math.exp(total_nll / max(total_tokens, 1)), total_tokens, len(chunks), window, elapsed)
