"""The rejection sampler keeps the target's distribution (chi-square over many seeded draws on small
vocabularies), accept-while-equal verification, and processed_probs against the Sampler's own draws.

Every test draws from a fixed seed, so each outcome is deterministic: a bound that holds once holds
always (no flakes). The bounds are the chi-square quantiles at p = 1e-6, far above the statistic a
correct sampler shows; a sampler that returns the draft's tokens instead fails them by orders of magnitude.
"""
from __future__ import annotations

import torch

from scaleinfer.request import Request
from scaleinfer.sampler import Sampler, SamplingMetadata
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.spec_decode.rejection import accept_matching, processed_probs, rejection_sample, rows_metadata

CHI2_1E6 = {3: 30.66, 5: 35.89, 7: 40.52}
"""Upper chi-square quantiles at p = 1e-6 by degrees of freedom."""


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def draws(p: torch.Tensor, q: torch.Tensor, n: int, seed: int, sampler=rejection_sample) -> list[list[int]]:
    """n runs of the sampler: drafts drawn from q, uniforms from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    k = q.shape[0]
    out = []
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        u = torch.rand(2 * k + 1, dtype=torch.float64, generator=g).tolist()
        out.append(sampler(p, q, drafts, u[:k], u[k:]))
    return out


def test_rejection_sampler_keeps_the_target_distribution():
    torch.manual_seed(0)
    vocab, k = 6, 3
    p = torch.softmax(torch.randn(k + 1, vocab) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, vocab) * 1.5, dim=-1)
    p[1, 4] = 0.0   # a token the target never emits but the draft proposes
    p[1] /= p[1].sum()
    runs = draws(p, q, 12000, seed=1)
    for pos in range(k + 1):
        # Token `pos` of a run is present when the run got that far; it is then distributed as p[pos]
        # (positions are independent here: p does not depend on the context).
        tokens = torch.tensor([r[pos] for r in runs if len(r) > pos])
        assert len(tokens) > 500
        counts = torch.bincount(tokens, minlength=vocab).double()
        assert chi2(counts, p[pos]) < CHI2_1E6[5], f"position {pos}"
    accepted = sum(len(r) - 1 for r in runs) / (k * len(runs))
    assert 0.2 < accepted < 1.0


def test_the_bound_rejects_a_sampler_that_ignores_the_target():
    torch.manual_seed(0)
    vocab, k = 6, 2
    p = torch.softmax(torch.randn(k + 1, vocab) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, vocab) * 1.5, dim=-1)

    def accept_all(p, q, drafts, accept_u, residual_u):
        return list(drafts) + [0]

    runs = draws(p, q, 20000, seed=1, sampler=accept_all)
    counts = torch.bincount(torch.tensor([r[0] for r in runs]), minlength=vocab).double()
    assert chi2(counts, p[0]) > 10 * CHI2_1E6[5]


def test_identical_draft_is_always_accepted_and_disjoint_always_rejected():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    assert rejection_sample(p, p[:1], [1], [0.999], [0.3, 0.7]) == [1, 3]
    q = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert rejection_sample(p, q, [2], [0.0], [0.7, 0.1]) == [1]   # rejected: residual = p[0]


def test_accept_matching():
    assert accept_matching([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert accept_matching([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert accept_matching([1, 2], [3]) == [1]


def test_processed_probs_is_what_the_sampler_draws_from():
    """Top-k / top-p / min-p / temperature / penalties: processed_probs' support and weights match the
    Sampler's empirical frequencies (seeded draws at many positions)."""
    torch.manual_seed(3)
    vocab = 8
    logits = torch.randn(1, vocab) * 2
    for params in (SamplingParams(temperature=0.7, top_k=4), SamplingParams(temperature=1.3, top_p=0.8),
                   SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=1.5),
                   SamplingParams(temperature=0.9)):
        req = Request("r", [1, 2], params)
        req.append_output_token(3)
        meta = rows_metadata([(req, [])], vocab)
        probs = processed_probs(logits, meta)[0]
        sampler = Sampler(seed=7)
        n = 4000
        tokens = []
        for pos in range(n):
            m = SamplingMetadata.from_params([params], [[1, 2]], [[3]], [None], (), vocab)
            tokens.append(int(sampler(logits, m).sampled_token_ids[0]))
        counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
        assert chi2(counts, probs) < CHI2_1E6[7], params


def test_greedy_rows_are_one_hot():
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    req = Request("r", [0], SamplingParams(temperature=0))
    assert processed_probs(logits, rows_metadata([(req, [])], 3)).tolist() == [[0.0, 1.0, 0.0]]
