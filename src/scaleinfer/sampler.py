"""Sampler: the logits of the rows to sample -> next token ids (+ logprobs). Fed by the ModelRunner.

One row is one request with its own SamplingParams. Each step, vectorised over the rows of a kind:

 1. bans: while a row has fewer than min_tokens outputs, its EOS and stop ids get -inf;
 2. penalties, exactly as vLLM: repetition (CTRL, Keskar et al. 2019, arXiv:1909.05858: a positive
    logit is divided by r, a negative one multiplied by r, for every token seen in prompt OR output),
    then frequency and presence (OpenAI: minus f * count, then minus a if count > 0; output only).
    They touch only the seen ids (gather / scatter), never a [B, V] count matrix;
 2b. grammar mask (structured outputs): the tokens the request's grammar does not allow next get
    -inf (structured/bitmask.py: one bitmask for the batch, applied to its constrained rows only);
    a constrained row gets no min_tokens bans: its grammar decides where the output may end;
 3. greedy rows (temperature 0) take the argmax of the penalised logits. When every row is greedy
    this is the whole job: no softmax, no sort, no random numbers;
 4. the other rows work with unnormalised probabilities w = exp((logit - max) / temperature): the
    top token weighs 1, so no softmax normaliser is needed and min-p is simply w >= min_p;
 5. rows with top-k or top-p keep a prefix of the row sorted by weight, so they sample among the
    candidates of a partial sort (topk) instead of the whole vocabulary: top-k keeps k, then top-p
    (nucleus, Holtzman et al. 2019, arXiv:1904.09751) keeps the smallest prefix holding p of the
    mass left by top-k, then min-p (Nguyen et al. 2024, arXiv:2407.01082) drops w < min_p. A
    top-p-only row tries 256 candidates, then 4096, then a full sort, moving on only while the
    candidates hold less than p of the row's mass; a 152k-token sort costs ~10 ms per row on one
    core, and typical nuclei fit the first tier. Ties at the k-th token are broken by topk's order;
 6. sample by inverse CDF: one uniform u per row picks the token whose cumulative weight first
    passes u * total (two levels, 256-token blocks then one block, in float64 so rounding cannot
    swallow tail tokens); zero-weight tokens are never picked;
 7. logprobs: log_softmax of the RAW model logits (before bans, penalties, temperature and
    truncation), as vLLM reports them by default and as the OpenAI API defines them; only for the
    rows that asked.

Why inverse CDF and not vLLM's exponential race (argmax(p / E), E ~ Exp(1) per token): the race
needs V random numbers per row, and on a CPU drawing 152k exponentials costs ~2.2 ms per row
(~70 ms for 32 rows), more than everything else here together. Inverse CDF needs one number per row.

Reproducibility: a seeded row's u is a SplitMix64 hash of (seed, output position): no generator and
no shared state, so its token depends only on its own logits, parameters, seed and position: not on
the batch, the row order, other rows' seeds, or a preemption that recomputes the request (the
position is the number of output tokens so far, which recompute preserves). Float rounding of a
row's reductions may differ with the batch shape, which can move a token only when u lies within
~1e-7 of a boundary between two tokens. Unseeded rows draw from
one CPU torch.Generator owned by the Sampler (seeded once, e.g. with the engine seed), in row order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaleinfer.sampling_params import SamplingParams
from scaleinfer.structured.bitmask import BatchMask, apply_bitmask

_BLOCK_SIZE = 256
"""Tokens per block of the two-level inverse CDF (about sqrt(V) for V ~ 50k..150k)."""
_TOPK_TIERS = (256, 4096)
"""Candidates tried for a top-p-only row before a full sort (topk(256) costs ~2% of a 152k sort)."""
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingMetadata:
    """Everything the Sampler needs about one batch, as tensors on the CPU; built by from_params.

    Optional tensors are None when no row uses the feature, so the Sampler skips it entirely.
    """

    temperature: torch.Tensor                 # [B] float32, 0 => greedy row
    top_k: torch.Tensor | None                # [B] int64, 0 => off
    top_p: torch.Tensor | None                # [B] float32, 1 => off
    min_p: torch.Tensor | None                # [B] float32, 0 => off
    repetition_penalty: torch.Tensor | None   # [B] float32, 1 => off
    presence_penalty: torch.Tensor | None     # [B] float32, 0 => off
    frequency_penalty: torch.Tensor | None    # [B] float32, 0 => off
    penalty_rows: torch.Tensor | None         # [R] int64: the rows with any penalty on
    prompt_token_ids: torch.Tensor | None     # [R, Lp] int64 per penalty row, padded with vocab_size;
                                              # None if no row has a repetition penalty
    output_token_ids: torch.Tensor | None     # [R, Lo] int64 per penalty row, padded with vocab_size
    seeds: list[int | None]                   # per row
    output_positions: list[int]               # per row: index in its output of the token being sampled
    max_num_logprobs: int | None              # top-N over rows; None if no row wants logprobs
    logprob_rows: torch.Tensor | None         # [L] int64: rows that want logprobs
    all_greedy: bool
    banned_ids: torch.Tensor | None           # [2, N] int64 (row, token id) pairs that must not be
                                              # sampled now (EOS / stop ids below min_tokens)
    grammar_mask: BatchMask | None = None     # structured outputs: the allowed tokens of constrained rows

    @classmethod
    def from_params(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                    output_token_ids: list[list[int]], seeds: list[int | None], eos_token_ids: tuple[int, ...],
                    vocab_size: int) -> "SamplingMetadata":
        num_rows = len(params)
        assert len(prompt_token_ids) == len(output_token_ids) == len(seeds) == num_rows

        def column(name: str, off: float, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            values = [getattr(p, name) for p in params]
            return None if all(v == off for v in values) else torch.tensor(values, dtype=dtype)

        repetition = column("repetition_penalty", 1.0)
        presence = column("presence_penalty", 0.0)
        frequency = column("frequency_penalty", 0.0)
        penalty_rows = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0
                        or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        prompts = outputs = None
        if penalty_rows:
            outputs = _padded([output_token_ids[row] for row in penalty_rows], vocab_size)
            if repetition is not None:
                prompts = _padded([prompt_token_ids[row] if params[row].repetition_penalty != 1.0 else []
                                   for row in penalty_rows], vocab_size)
        logprob_rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=column("top_k", 0, torch.int64), top_p=column("top_p", 1.0), min_p=column("min_p", 0.0),
            repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
            penalty_rows=torch.tensor(penalty_rows, dtype=torch.int64) if penalty_rows else None,
            prompt_token_ids=prompts, output_token_ids=outputs,
            seeds=list(seeds), output_positions=[len(out) for out in output_token_ids],
            max_num_logprobs=max(params[row].logprobs for row in logprob_rows) if logprob_rows else None,
            logprob_rows=torch.tensor(logprob_rows, dtype=torch.int64) if logprob_rows else None,
            all_greedy=all(p.temperature == 0.0 for p in params),
            banned_ids=_banned_ids(params, output_token_ids, eos_token_ids, vocab_size),
        )


def _padded(rows: list[list[int]], vocab_size: int) -> torch.Tensor:
    """[R, max len] int64; padding and ids outside [0, vocab_size) become vocab_size (a scratch column)."""
    width = max(1, max(len(ids) for ids in rows))
    ids = torch.tensor([ids + [vocab_size] * (width - len(ids)) for ids in rows], dtype=torch.int64)
    return ids.masked_fill_((ids < 0) | (ids >= vocab_size), vocab_size)


def _banned_ids(params: list[SamplingParams], output_token_ids: list[list[int]],
                eos_token_ids: tuple[int, ...], vocab_size: int) -> torch.Tensor | None:
    pairs = []
    for row, (p, out) in enumerate(zip(params, output_token_ids)):
        if len(out) < p.min_tokens and p.structured_outputs is None:
            ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            pairs.extend((row, i) for i in sorted(ids) if 0 <= i < vocab_size)
    return torch.tensor(pairs, dtype=torch.int64).T.contiguous() if pairs else None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor           # [B] int64
    logprobs: torch.Tensor | None             # [B] float32 raw logprob of the sampled token
    top_logprob_ids: torch.Tensor | None      # [B, N] int64, best first
    top_logprobs: torch.Tensor | None         # [B, N] float32, best first
    # The logprob tensors are None if no row asked; rows that did not ask hold NaN / -1.


def seeded_uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position): SplitMix64 (Steele et al. 2014)
    over the seed, xor the position, mixed again; the top 53 bits become the float."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 11) * 2.0 ** -53


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Sampler:
    """Stateless except for the generator of unseeded rows; see the module docstring."""

    def __init__(self, seed: int = 0):
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw = logits.float()                                  # [B, V]
        processed = raw
        if meta.banned_ids is not None or meta.penalty_rows is not None or meta.grammar_mask is not None:
            processed = raw.clone()
            if meta.banned_ids is not None:
                banned = meta.banned_ids.to(raw.device)
                processed[banned[0], banned[1]] = float("-inf")
            if meta.penalty_rows is not None:
                apply_penalties(processed, meta)
            if meta.grammar_mask is not None:
                apply_bitmask(processed, meta.grammar_mask)
        if meta.all_greedy:
            tokens = processed.argmax(dim=-1)
        else:
            tokens = self._sample(processed, meta)
        return _with_logprobs(tokens, raw, meta)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """[B] tokens of a batch with at least one random row; each kind of row is one vectorised pass."""
        device = logits.device
        greedy, plain, truncated = _row_kinds(meta)
        uniforms = self._uniforms(meta, plain + truncated).to(device)
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=device)
        if greedy:
            index = torch.tensor(greedy, device=device)
            tokens.index_copy_(0, index, _select(logits, index).argmax(dim=-1))
        if plain:
            index = torch.tensor(plain, device=device)
            tokens.index_copy_(0, index, sample_full_vocab(
                _select(logits, index), _select(meta.temperature, index), _select(meta.min_p, index),
                uniforms[index]))
        if truncated:
            index = torch.tensor(truncated, device=device)
            tokens.index_copy_(0, index, sample_top_k_top_p(
                _select(logits, index), _select(meta.temperature, index), _select(meta.top_k, index),
                _select(meta.top_p, index), _select(meta.min_p, index), uniforms[index]))
        return tokens

    def random(self, n: int) -> list[float]:
        """n uniforms in [0, 1) from the generator of unseeded rows (speculative decoding's draws)."""
        return torch.rand(n, dtype=torch.float64, generator=self._generator).tolist()

    def _uniforms(self, meta: SamplingMetadata, rows: list[int]) -> torch.Tensor:
        """[B] float64: u in [0, 1) for each random row (0 elsewhere); see the module docstring."""
        unseeded = [row for row in rows if meta.seeds[row] is None]
        shared = torch.rand(len(unseeded), dtype=torch.float64, generator=self._generator).tolist()
        values = [0.0] * len(meta.seeds)
        for row, u in zip(unseeded, shared):
            values[row] = u
        for row in rows:
            if meta.seeds[row] is not None:
                values[row] = seeded_uniform(meta.seeds[row], meta.output_positions[row])
        return torch.tensor(values, dtype=torch.float64)


def _row_kinds(meta: SamplingMetadata) -> tuple[list[int], list[int], list[int]]:
    """Rows that are greedy, sampled over the whole vocabulary, and sampled after top-k / top-p."""
    num_rows = len(meta.seeds)
    top_k = meta.top_k.tolist() if meta.top_k is not None else [0] * num_rows
    top_p = meta.top_p.tolist() if meta.top_p is not None else [1.0] * num_rows
    greedy, plain, truncated = [], [], []
    for row, t in enumerate(meta.temperature.tolist()):
        kind = greedy if t == 0.0 else truncated if top_k[row] > 0 or top_p[row] < 1.0 else plain
        kind.append(row)
    return greedy, plain, truncated


def _select(values: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """values[index] on index's device; values itself when index is every row in order (no copy)."""
    if values is None:
        return None
    values = values.to(index.device)
    return values if len(index) == values.shape[0] else values.index_select(0, index)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Repetition, then frequency, then presence penalty (vLLM's order), in place on meta.penalty_rows.

    Works on the seen ids only: gather their logits, scatter the penalised values back. An id seen
    twice writes the same value twice, so duplicates are harmless.
    """
    device = logits.device
    rows = meta.penalty_rows.to(device)
    vocab_size = logits.shape[1]
    x = F.pad(logits.index_select(0, rows), (0, 1))          # [R, V + 1]: column V absorbs the padding
    output_ids = meta.output_token_ids.to(device)            # [R, Lo]
    if meta.repetition_penalty is not None:
        seen = torch.cat([meta.prompt_token_ids.to(device), output_ids], dim=1)
        penalty = _select(meta.repetition_penalty, rows).unsqueeze(1)
        values = x.gather(1, seen)
        x.scatter_(1, seen, torch.where(values > 0, values / penalty, values * penalty))
    if meta.frequency_penalty is not None or meta.presence_penalty is not None:
        counts = torch.zeros_like(x).scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=x.dtype))
        values = x.gather(1, output_ids)
        if meta.frequency_penalty is not None:
            values -= _select(meta.frequency_penalty, rows).unsqueeze(1) * counts.gather(1, output_ids)
        if meta.presence_penalty is not None:
            values -= _select(meta.presence_penalty, rows).unsqueeze(1)   # every gathered id is present
        x.scatter_(1, output_ids, values)
    logits.index_copy_(0, rows, x[:, :vocab_size])


def sample_full_vocab(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor | None,
                      uniforms: torch.Tensor) -> torch.Tensor:
    """[S] tokens for rows without top-k / top-p: temperature, min-p, inverse CDF over all V."""
    # [S, V] unnormalised probabilities, top token = 1 (safe for any temperature > 0).
    weights = torch.sub(logits, logits.amax(dim=-1, keepdim=True)).div_(temperature.unsqueeze(1)).exp_()
    if min_p is not None:
        weights.mul_(weights >= min_p.unsqueeze(1))
    return sample_inverse_cdf(weights, uniforms)


def sample_top_k_top_p(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None, min_p: torch.Tensor | None,
                       uniforms: torch.Tensor) -> torch.Tensor:
    """[S] tokens for rows with top-k and / or top-p, sampled among partial-sort candidates (step 5)."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    top_k = top_k if top_k is not None else torch.zeros(num_rows, dtype=torch.int64, device=device)
    top_p = top_p if top_p is not None else torch.ones(num_rows, device=device)
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    k_rows, p_only = (top_k > 0).nonzero().squeeze(1), (top_k == 0).nonzero().squeeze(1)
    # Top-k rows: one partial sort of the largest k. Top-p-only rows: growing tiers (step 5).
    for group, sizes, top_p_only in ((k_rows, (int(top_k.max()),), False),
                                     (p_only, (*_TOPK_TIERS, vocab_size), True)):
        if group.numel() == 0:
            continue
        x = logits if len(group) == num_rows else logits.index_select(0, group)     # [G, V]
        t, k, p = temperature[group], top_k[group], top_p[group]
        m = None if min_p is None else min_p[group]
        # Mass relative to the top token; used by top-p-only rows (top-k rows renormalise over their k).
        totals = torch.ones(len(group), dtype=torch.float64, device=device)
        if top_p_only:
            totals = torch.sub(x, x.amax(dim=-1, keepdim=True)).div_(t.unsqueeze(1)).exp_().sum(dim=-1).double()
        pending = torch.arange(len(group), device=device)        # rows of the group still to sample
        for size in sizes:
            size = min(size, vocab_size)
            rows_x = x if len(pending) == len(group) else x.index_select(0, pending)
            if size < vocab_size:
                values, ids = rows_x.topk(size, dim=-1)            # [P, size], best first
            else:
                values, ids = rows_x.sort(dim=-1, descending=True)
            weights, done = _nucleus(values, t[pending], k[pending], p[pending], totals[pending],
                                     None if m is None else m[pending], size == vocab_size)
            finished = group[pending] if bool(done.all()) else group[pending[done]]
            if finished.numel():
                chosen = sample_inverse_cdf(weights[done], uniforms[finished])
                tokens.index_copy_(0, finished, ids[done].gather(1, chosen.unsqueeze(1)).squeeze(1))
            pending = pending[~done]
            if pending.numel() == 0:
                break
    return tokens


def _nucleus(values: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             totals: torch.Tensor, min_p: torch.Tensor | None, complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the sorted candidate logits after top-k, top-p and min-p (dropped = 0), and per row
    whether the candidates were enough: always for top-k rows; for a top-p-only row when they hold p
    of its total mass (or are `complete`, the whole row)."""
    size = values.shape[1]
    weights = torch.sub(values, values[:, :1]).div_(temperature.unsqueeze(1)).exp_()   # [P, size], top = 1
    in_k = torch.arange(size, device=values.device) < torch.where(top_k > 0, top_k, size).unsqueeze(1)
    weights = weights * in_k
    cumulative = weights.double().cumsum(dim=-1)
    mass = torch.where(top_k > 0, cumulative[:, -1], totals)
    # Keep a token while the mass strictly before it is below p: the smallest prefix holding p.
    keep = (cumulative - weights) < (top_p * mass).unsqueeze(1)
    if min_p is not None:
        keep &= weights >= min_p.unsqueeze(1)
    done = (top_k > 0) | (cumulative[:, -1] >= top_p * mass) | complete
    return weights * keep, done


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[S] the index whose cumulative weight first exceeds u * total, for [S, V] weights >= 0.

    Two levels so that float32 rounding cannot swallow tail tokens: block sums (float32, pairwise)
    are accumulated in float64 to pick a block, then only that block's weights are accumulated, in
    float64, to pick the index. Zero-weight indices are never chosen.
    """
    num_rows, vocab_size = weights.shape
    block_size = min(_BLOCK_SIZE, vocab_size)
    num_full = vocab_size // block_size
    block_sums = weights[:, :num_full * block_size].reshape(num_rows, num_full, block_size).sum(dim=-1)
    if num_full * block_size < vocab_size:
        block_sums = torch.cat([block_sums, weights[:, num_full * block_size:].sum(dim=-1, keepdim=True)], dim=1)
    block_cdf = block_sums.double().cumsum(dim=-1)                     # [S, num_blocks]
    target = uniforms.unsqueeze(1) * block_cdf[:, -1:]                 # [S, 1], below the total
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[1] - 1)
    offset = target - F.pad(block_cdf, (1, 0)).gather(1, block)        # mass into the chosen block
    token_ids = block * block_size + torch.arange(block_size, device=weights.device)   # [S, block]
    inside = weights.gather(1, token_ids.clamp(max=vocab_size - 1)).double() * (token_ids < vocab_size)
    chosen = torch.searchsorted(inside.cumsum(dim=-1), offset.clamp_(min=0), right=True)
    # Rounding can put the offset past the block's own total: fall back to its last positive token.
    last_positive = (block_size - 1) - (inside > 0).flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)
    return token_ids.gather(1, torch.minimum(chosen, last_positive)).squeeze(1)


def _with_logprobs(tokens: torch.Tensor, raw: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    if meta.max_num_logprobs is None:
        return SamplerOutput(tokens, None, None, None)
    rows = meta.logprob_rows.to(raw.device)
    batch, num_top = raw.shape[0], meta.max_num_logprobs
    logprobs = torch.log_softmax(raw if len(rows) == batch else raw.index_select(0, rows), dim=-1)
    top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    sampled = logprobs.gather(1, tokens.index_select(0, rows).unsqueeze(1)).squeeze(1)
    if len(rows) == batch:
        return SamplerOutput(tokens, sampled, top_ids, top_lp)
    out_lp = torch.full((batch,), float("nan"), device=raw.device).index_copy_(0, rows, sampled)
    out_top_lp = torch.full((batch, num_top), float("nan"), device=raw.device).index_copy_(0, rows, top_lp)
    out_top_ids = torch.full((batch, num_top), -1, dtype=torch.int64, device=raw.device).index_copy_(0, rows, top_ids)
    return SamplerOutput(tokens, out_lp, out_top_ids, out_top_lp)
