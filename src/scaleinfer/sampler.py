"""Sampler: logits of the sampled rows -> next token ids (+ logprobs). Fed by the ModelRunner.

Algorithm, per step, vectorised over the batch (a row = one request):
 1. logprobs (if any row asked) = log_softmax of the raw model logits, as vLLM and OpenAI report them;
 2. penalties: repetition (CTRL, Keskar et al. 2019: positive logits / p, negative * p, for tokens
    seen in prompt or output), presence and frequency (OpenAI: minus a, minus b * count, output only);
 3. min_tokens: EOS and stop ids get -inf while a row is below its minimum;
 4. greedy rows take argmax here; the rest go on;
 5. temperature, then top-k and top-p from one shared sort (only if some row uses them), then min-p;
 6. sample with the exponential race: argmax(p / E), E ~ Exp(1), which draws from p exactly.
    A seeded row draws E from its own generator seeded by hash(seed, output position), so its
    token depends only on its own logits, seed and position: not on the batch, row order or
    preemption. Unseeded rows share one generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor                 # [B] float32, 0 => greedy
    top_k: torch.Tensor | None                # [B] int64, 0 => off
    top_p: torch.Tensor | None                # [B] float32
    min_p: torch.Tensor | None                # [B] float32
    repetition_penalty: torch.Tensor | None   # [B]
    presence_penalty: torch.Tensor | None     # [B]
    frequency_penalty: torch.Tensor | None    # [B]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    seeds: list[int | None]
    output_positions: list[int]
    max_num_logprobs: int | None
    all_greedy: bool
    banned_ids: list[list[int]]               # per row: ids that may not be sampled now (min_tokens)

    @classmethod
    def from_params(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                    output_token_ids: list[list[int]], seeds: list[int | None], eos_token_ids: tuple[int, ...],
                    vocab_size: int) -> "SamplingMetadata":
        def column(name: str, neutral: float, dtype=torch.float32) -> torch.Tensor | None:
            values = [getattr(p, name) for p in params]
            return None if all(v == neutral for v in values) else torch.tensor(values, dtype=dtype)

        banned = []
        for p, out in zip(params, output_token_ids):
            ids = []
            if len(out) < p.min_tokens:
                ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            banned.append([i for i in ids if 0 <= i < vocab_size])
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=column("top_k", 0, torch.long), top_p=column("top_p", 1.0), min_p=column("min_p", 0.0),
            repetition_penalty=column("repetition_penalty", 1.0),
            presence_penalty=column("presence_penalty", 0.0), frequency_penalty=column("frequency_penalty", 0.0),
            prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids, seeds=list(seeds),
            output_positions=[len(o) for o in output_token_ids],
            max_num_logprobs=max(wanted) if wanted else None,
            all_greedy=all(p.temperature == 0.0 for p in params), banned_ids=banned,
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor           # [B] int64
    logprobs: torch.Tensor | None             # [B] logprob of the sampled token
    top_logprob_ids: torch.Tensor | None      # [B, N]
    top_logprobs: torch.Tensor | None         # [B, N]


def _seeded_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(hash((seed, position)) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


class Sampler:
    def __init__(self, seed: int = 0):
        self._generator: torch.Generator | None = None
        self._seed = seed

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        if not meta.all_greedy or any(meta.banned_ids) or meta.repetition_penalty is not None \
                or meta.presence_penalty is not None or meta.frequency_penalty is not None:
            logits = logits.clone()
        self._apply_penalties(logits, meta)
        for row, ids in enumerate(meta.banned_ids):
            if ids:
                logits[row, ids] = float("-inf")

        if meta.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, meta)
        return self._with_logprobs(tokens, raw_logprobs, meta)

    # ---- penalties ---------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
        batch, vocab = logits.shape
        if meta.presence_penalty is not None or meta.frequency_penalty is not None:
            counts = torch.zeros(batch, vocab, dtype=logits.dtype, device=logits.device)
            for row, out in enumerate(meta.output_token_ids):
                if out:
                    ids = torch.tensor(out, device=logits.device)
                    counts[row].index_add_(0, ids, torch.ones(len(out), dtype=logits.dtype, device=logits.device))
            if meta.frequency_penalty is not None:
                logits -= meta.frequency_penalty.to(logits.device).unsqueeze(1) * counts
            if meta.presence_penalty is not None:
                logits -= meta.presence_penalty.to(logits.device).unsqueeze(1) * (counts > 0).to(logits.dtype)
        if meta.repetition_penalty is not None:
            seen = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)
            for row, (prompt, out) in enumerate(zip(meta.prompt_token_ids, meta.output_token_ids)):
                seen[row, torch.tensor(prompt + out, dtype=torch.long, device=logits.device)] = True
            penalty = meta.repetition_penalty.to(logits.device).unsqueeze(1).expand_as(logits)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            torch.where(seen, scaled, logits, out=logits)

    # ---- sampling ----------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy_rows = meta.temperature == 0
        greedy_tokens = logits.argmax(dim=-1)
        temperature = torch.where(greedy_rows, torch.ones_like(meta.temperature), meta.temperature)
        logits = logits / temperature.to(logits.device).unsqueeze(1)
        logits = self._top_k_top_p(logits, meta)
        probs = torch.softmax(logits, dim=-1)
        if meta.min_p is not None:
            threshold = probs.max(dim=-1, keepdim=True).values * meta.min_p.to(probs.device).unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = self._exponential_noise(probs, meta)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy_rows.to(sampled.device), greedy_tokens, sampled)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if meta.top_k is None and meta.top_p is None:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if meta.top_k is not None:
            k = meta.top_k.to(logits.device)
            k = torch.where(k <= 0, torch.full_like(k, vocab), k.clamp(max=vocab))
            remove |= torch.arange(vocab, device=logits.device).unsqueeze(0) >= k.unsqueeze(1)
        if meta.top_p is not None:
            probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
            # Keep a token if the mass strictly before it is below top_p (the top token always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            remove |= mass_before >= meta.top_p.to(logits.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    def _exponential_noise(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        noise = torch.empty_like(probs)
        unseeded = [row for row, seed in enumerate(meta.seeds) if seed is None]
        if unseeded:
            if self._generator is None or self._generator.device != probs.device:
                self._generator = torch.Generator(device=probs.device)
                self._generator.manual_seed(self._seed)
            if len(unseeded) == len(meta.seeds):
                noise.exponential_(generator=self._generator)
            else:
                rows = torch.tensor(unseeded, device=probs.device)
                noise[rows] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_(
                    generator=self._generator)
        for row, seed in enumerate(meta.seeds):
            if seed is not None:
                gen = _seeded_generator(seed, meta.output_positions[row], probs.device)
                noise[row].exponential_(generator=gen)
        return noise

    # ---- logprobs ----------------------------------------------------------------------------
    @staticmethod
    def _with_logprobs(tokens: torch.Tensor, raw: torch.Tensor | None, meta: SamplingMetadata) -> SamplerOutput:
        if raw is None:
            return SamplerOutput(tokens, None, None, None)
        sampled = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
        n = max(meta.max_num_logprobs or 0, 1)
        top_lp, top_ids = raw.topk(n, dim=-1)
        return SamplerOutput(tokens, sampled, top_ids, top_lp)
