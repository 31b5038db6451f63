"""Verification of draft tokens: which drafts the target keeps, and the token it adds, so that the output
follows the target's own distribution exactly (greedy: the very same tokens).

Fixed drafts (n-gram lookup, greedy drafting, or any draft when logprobs are asked): the target samples
each of its k + 1 rows with the engine's own Sampler, row j seeing the outputs plus drafts[:j] (so
penalties, min_tokens bans, seeds and logprobs are those of a step without speculation), and keeps the
drafts while its token equals them; the first difference, or the bonus row when all match, is its own
token. For a draft that is a fixed guess this is the rejection sampler of Leviathan et al. (2023) with a
one-hot q: accept d with probability p(d), else draw from norm(max(0, p - q)) = p without d.

Sampled drafts with their probabilities q (a draft model at temperature > 0): the full rejection sampler
(Leviathan et al. 2023, Chen et al. 2023; vLLM's RejectionSampler): accept d_j with probability
min(1, p_j(d_j) / q_j(d_j)); on the first rejection draw from norm(max(0, p_j - q_j)) and stop; after k
acceptances draw the bonus token from p_k. p and q are the processed distributions (penalties,
temperature, top-k, top-p, min-p) the Sampler draws from (`processed_probs`).
"""
from __future__ import annotations

import torch

from scaleinfer.request import Request
from scaleinfer.sampler import (Sampler, SamplingMetadata, _nucleus, apply_penalties, sample_inverse_cdf,
                                seeded_uniform)
from scaleinfer.scheduler import ModelOutput

_ACCEPT_STREAM, _RESIDUAL_STREAM, _DRAFT_STREAM = 0x5EC0_0001, 0x5EC0_0002, 0x5EC0_0003
"""Seeded requests draw their speculative uniforms from (seed ^ stream, position): reproducible, and
independent of the Sampler's own draws at the same positions."""


def rows_metadata(requests: list[tuple[Request, list[int]]], vocab_size: int,
                  last_only: bool = False) -> SamplingMetadata:
    """SamplingMetadata of the k + 1 rows of each (request, drafts): row j as if drafts[:j] were already
    in the output (penalties, bans and seeded positions follow); `last_only`: row k alone."""
    params, prompts, outputs, seeds = [], [], [], []
    for req, drafts in requests:
        for j in range(len(drafts) if last_only else 0, len(drafts) + 1):
            params.append(req.sampling_params)
            prompts.append(req.prompt_token_ids)
            outputs.append(req.output_token_ids + drafts[:j])
            seeds.append(req.sampling_params.seed)
    eos = requests[0][0].eos_token_ids if requests else ()
    return SamplingMetadata.from_params(params, prompts, outputs, seeds, eos, vocab_size)


def accept_matching(target_tokens: list[int], drafts: list[int]) -> list[int]:
    """The drafts while they equal the target's tokens, then the target's token at the first difference
    (or its bonus token after the last draft)."""
    out: list[int] = []
    for token, draft in zip(target_tokens, drafts):
        out.append(token)
        if token != draft:
            return out
    out.append(target_tokens[len(drafts)])
    return out


def verify(sampler: Sampler, logits: torch.Tensor, spec_requests: list[tuple[Request, list[int]]],
           out: ModelOutput) -> None:
    """Verify every (request, drafts) of a step from its k + 1 logits rows (in order in `logits`); the
    kept tokens (and logprobs) go to out.spec_token_ids / out.spec_logprobs."""
    starts, row = [], 0
    for _, drafts in spec_requests:
        starts.append(row)
        row += len(drafts) + 1
    full = [i for i, (req, _) in enumerate(spec_requests) if _needs_full_rejection(req)]
    fixed = [i for i in range(len(spec_requests)) if i not in set(full)]
    for group, check in ((fixed, _verify_fixed), (full, _verify_full)):
        if group:
            rows = torch.tensor([starts[i] + j for i in group for j in range(len(spec_requests[i][1]) + 1)],
                                device=logits.device)
            check(sampler, logits.index_select(0, rows), [spec_requests[i] for i in group], out)


def _verify_fixed(sampler: Sampler, logits: torch.Tensor, group: list[tuple[Request, list[int]]],
                  out: ModelOutput) -> None:
    result = sampler(logits, rows_metadata(group, logits.shape[-1]))
    tokens = result.sampled_token_ids.tolist()
    s = 0
    for req, drafts in group:
        kept = accept_matching(tokens[s:s + len(drafts) + 1], drafts)
        out.spec_token_ids[req.request_id] = kept
        n = req.sampling_params.logprobs
        if n is not None:
            lps, ids, top = result.logprobs.tolist(), result.top_logprob_ids.tolist(), result.top_logprobs.tolist()
            out.spec_logprobs[req.request_id] = [
                (lps[s + j], dict(zip(ids[s + j][:n], top[s + j][:n]))) for j in range(len(kept))]
        s += len(drafts) + 1


def _verify_full(sampler: Sampler, logits: torch.Tensor, group: list[tuple[Request, list[int]]],
                 out: ModelOutput) -> None:
    probs = processed_probs(logits, rows_metadata(group, logits.shape[-1]))
    s = 0
    for req, drafts in group:
        k = len(drafts)
        accept_u, residual_u = _uniforms(sampler, req, k)
        out.spec_token_ids[req.request_id] = rejection_sample(
            probs[s:s + k + 1], _fit_vocab(req.spec_draft_probs[:k], probs.shape[-1]), drafts, accept_u,
            residual_u)
        s += k + 1


def _fit_vocab(q: torch.Tensor, vocab: int) -> torch.Tensor:
    """The draft's probabilities over the target's vocabulary (the two may pad their embeddings
    differently; ids past either's real tokens have probability 0)."""
    q = q.to(torch.float32)
    if q.shape[-1] >= vocab:
        return q[:, :vocab]
    return torch.nn.functional.pad(q, (0, vocab - q.shape[-1]))


def _needs_full_rejection(req: Request) -> bool:
    p = req.sampling_params
    return req.spec_draft_probs is not None and p.temperature > 0 and p.logprobs is None


def _uniforms(sampler: Sampler, req: Request, k: int) -> tuple[list[float], list[float]]:
    """k acceptance uniforms and k + 1 residual / bonus uniforms for one request."""
    seed, pos = req.sampling_params.seed, req.num_output_tokens
    if seed is None:
        draws = sampler.random(2 * k + 1)
        return draws[:k], draws[k:]
    return ([seeded_uniform(seed ^ _ACCEPT_STREAM, pos + j) for j in range(k)],
            [seeded_uniform(seed ^ _RESIDUAL_STREAM, pos + j) for j in range(k + 1)])


def draft_uniform(seed: int, position: int) -> float:
    """The uniform a seeded request's draft model samples its draft at `position` with."""
    return seeded_uniform(seed ^ _DRAFT_STREAM, position)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, drafts: list[int], accept_u: list[float],
                     residual_u: list[float]) -> list[int]:
    """Leviathan et al.'s rejection sampler over one request: p [k + 1, V] target and q [k, V] draft
    probabilities (rows sum to 1), the drafts (drawn from q), k uniforms to accept with and k + 1 to
    draw a residual or the bonus token with. Returns the accepted drafts and one token of the target's."""
    out: list[int] = []
    p64, q64 = p.double(), q.double()
    for j, d in enumerate(drafts):
        pd, qd = float(p64[j, d]), float(q64[j, d])
        if qd > 0.0 and accept_u[j] * qd < pd:   # u < min(1, p / q)
            out.append(d)
            continue
        residual = (p64[j] - q64[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:   # p == q up to rounding: rejection had probability ~0
            residual = p64[j]
        out.append(_draw(residual, residual_u[j]))
        return out
    out.append(_draw(p64[len(drafts)], residual_u[len(drafts)]))
    return out


def _draw(weights: torch.Tensor, u: float) -> int:
    return int(sample_inverse_cdf(weights.unsqueeze(0), torch.tensor([u], dtype=torch.float64))[0])


@torch.inference_mode()
def processed_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """[R, V] float32: the distribution the Sampler draws each row from (bans, penalties, temperature,
    top-k, top-p, min-p; a greedy row is one-hot on its argmax)."""
    x = logits.float().clone()
    if meta.banned_ids is not None:
        banned = meta.banned_ids.to(x.device)
        x[banned[0], banned[1]] = float("-inf")
    if meta.penalty_rows is not None:
        apply_penalties(x, meta)
    rows, vocab = x.shape
    probs = torch.zeros_like(x)
    temps = meta.temperature.tolist()
    top_k = meta.top_k.tolist() if meta.top_k is not None else [0] * rows
    top_p = meta.top_p.tolist() if meta.top_p is not None else [1.0] * rows
    min_p = meta.min_p.tolist() if meta.min_p is not None else [0.0] * rows
    for r in range(rows):
        if temps[r] == 0.0:
            probs[r, int(x[r].argmax())] = 1.0
            continue
        t = torch.tensor([temps[r]])
        if top_k[r] > 0 or top_p[r] < 1.0:
            if top_k[r] > 0:
                values, ids = x[r].topk(min(top_k[r], vocab))
            else:
                values, ids = x[r].sort(descending=True)
            total = torch.sub(x[r], values[0]).div_(t).exp_().sum().double().view(1)
            weights, _ = _nucleus(values.unsqueeze(0), t, torch.tensor([top_k[r]]), torch.tensor([top_p[r]]),
                                  total, None if min_p[r] == 0.0 else torch.tensor([min_p[r]]), True)
            probs[r].scatter_(0, ids, weights[0])
        else:
            w = torch.sub(x[r], x[r].max()).div_(t).exp_()
            if min_p[r] > 0.0:
                w.mul_(w >= min_p[r])
            probs[r] = w
    return probs / probs.sum(dim=-1, keepdim=True)
