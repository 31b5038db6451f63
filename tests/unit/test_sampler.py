"""Sampler: greedy, temperature, top-k / top-p / min-p, penalties, seeds, min_tokens, logprobs."""
from __future__ import annotations

import pytest
import torch

from scaleinfer.errors import RequestError
from scaleinfer.sampler import (Sampler, SamplingMetadata, apply_penalties, sample_inverse_cdf,
                                sample_top_k_top_p, seeded_uniform)
from scaleinfer.sampling_params import SamplingParams

EOS = 3


def run(logits, params, outputs=None, prompts=None, sampler=None):
    n = logits.shape[0]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    meta = SamplingMetadata.from_params(params, prompts, outputs, [p.seed for p in params], (EOS,), logits.shape[1])
    return (sampler or Sampler(seed=0))(logits, meta)


def frequencies(logits_row, params, draws=20000):
    """Empirical distribution of one row sampled `draws` times (the row repeated, one step)."""
    logits = logits_row.unsqueeze(0).repeat(draws, 1)
    params = params if isinstance(params, list) else [params] * draws
    tokens = run(logits, params).sampled_token_ids
    return torch.bincount(tokens, minlength=logits.shape[1]).double() / draws


def total_variation(a, b):
    return 0.5 * (a.double() - b.double()).abs().sum().item()


def support(freq):
    return set(freq.nonzero().flatten().tolist())


# ---- greedy --------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    out = run(logits, [SamplingParams(temperature=0)] * 5)
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_rows_in_a_mixed_batch_stay_argmax():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5)] * 3
    out = run(logits, params)
    assert out.sampled_token_ids[0::2].tolist() == logits[0::2].argmax(-1).tolist()


# ---- distributions -------------------------------------------------------------------------------

def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5])
    for t in (1.0, 0.5, 2.0):
        freq = frequencies(logits, SamplingParams(temperature=t))
        assert total_variation(freq, torch.softmax(logits / t, -1)) < 0.02, t


def test_seeded_rows_follow_softmax_too():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5])
    params = [SamplingParams(temperature=0.7, seed=s) for s in range(20000)]
    freq = frequencies(logits, params)
    assert total_variation(freq, torch.softmax(logits / 0.7, -1)) < 0.02


def test_large_vocab_distribution_across_blocks():
    # 1000 tokens = 3 full blocks of 256 + a partial one; mass spread over all four, zeros between.
    logits = torch.full((1000,), float("-inf"))
    chosen = torch.tensor([0, 255, 256, 700, 767, 768, 999])
    logits[chosen] = torch.tensor([0.5, 1.0, 0.0, 2.0, -1.0, 0.3, 1.5])
    freq = frequencies(logits, SamplingParams(temperature=1.0), draws=30000)
    assert support(freq) <= set(chosen.tolist())
    assert total_variation(freq, torch.softmax(logits, -1)) < 0.02


def test_inverse_cdf_edges_never_pick_zero_weight_tokens():
    weights = torch.zeros(2, 600)
    weights[:, [5, 300, 530]] = torch.tensor([1.0, 2.0, 1e-3])
    u = torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64)
    assert sample_inverse_cdf(weights, u).tolist() == [5, 530]


# ---- truncation ----------------------------------------------------------------------------------

def test_top_k_only_samples_the_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, 2.8, -5.0])
    freq = frequencies(logits, SamplingParams(temperature=1.0, top_k=2))
    assert support(freq) == {1, 3}
    assert total_variation(freq[[1, 3]], torch.softmax(torch.tensor([3.0, 2.9]), -1)) < 0.02


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.3, 0.5, 0.05, 0.15])
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=0.75))
    # 0.5 < 0.75 <= 0.5 + 0.3: the nucleus is {1, 0}, renormalised.
    assert support(freq) == {0, 1}
    assert abs(freq[1].item() - 0.5 / 0.8) < 0.02
    # Exactly reaching p needs no further token; the top token always survives.
    assert support(frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=0.8))) == {0, 1}
    assert support(frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=0.01))) == {1}


def test_top_p_applies_after_top_k():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top-k 3 renormalises to 0.44, 0.33, 0.22; top-p 0.7 then keeps {0, 1} (0.44 < 0.7 <= 0.78).
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    assert support(freq) == {0, 1}


def test_top_p_uses_the_temperature_scaled_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    # At T=1 the nucleus for p=0.55 is {0}; at T=10 the distribution is nearly flat: {0, 1}.
    assert support(frequencies(probs.log(), SamplingParams(temperature=1.0, top_p=0.55))) == {0}
    assert support(frequencies(probs.log(), SamplingParams(temperature=10.0, top_p=0.55))) == {0, 1}


def _reference_last_kept(logits, t, k, p, min_p):
    """By definition on a full float64 sort: the least likely token that top-k, top-p, min-p keep."""
    out = []
    for row in range(logits.shape[0]):
        values, ids = (logits[row].double() / t[row].item()).sort(descending=True)
        if k[row] > 0:
            values, ids = values[:k[row]], ids[:k[row]]
        probs = torch.softmax(values, 0)
        keep = (probs.cumsum(0) - probs) < p[row].item()
        keep &= probs >= min_p[row].item() * probs[0]
        out.append(ids[keep.nonzero().max()].item())
    return out


# Nucleus sizes of the two top-p-only rows (0 and 2): 8.0 -> 2 and 50 (tier 256); 4.0 -> 52 and 1790
# (tier 4096); 2.5 -> 1927 and 8982 (full sort); 0.02 -> 17929 and 19790 (full sort, nearly flat).
@pytest.mark.parametrize("scale", [8.0, 4.0, 2.5, 0.02])
def test_top_k_top_p_candidates_match_a_full_sort(scale):
    logits = torch.randn(5, 20000, generator=torch.Generator().manual_seed(3)) * scale
    t = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.8])
    k = torch.tensor([0, 50, 0, 5000, 300])
    p = torch.tensor([0.9, 0.5, 0.99, 1.0, 0.95])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05])
    # u -> 1 picks the last candidate kept, u = 0 the top token.
    last = sample_top_k_top_p(logits, t, k, p, min_p, torch.full((5,), 1.0 - 2.0 ** -53, dtype=torch.float64))
    assert last.tolist() == _reference_last_kept(logits, t, k, p, min_p)
    first = sample_top_k_top_p(logits, t, k, p, None, torch.zeros(5, dtype=torch.float64))
    assert first.tolist() == logits.argmax(-1).tolist()


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.6, 0.3, 0.08, 0.02])
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, min_p=0.2))   # keeps p >= 0.12
    assert support(freq) == {0, 1}
    assert abs(freq[0].item() - 0.6 / 0.9) < 0.02


# ---- penalties -----------------------------------------------------------------------------------

def penalised(logits, params, prompts, outputs):
    meta = SamplingMetadata.from_params(params, prompts, outputs, [None] * len(params), (EOS,), logits.shape[1])
    work = logits.clone()
    apply_penalties(work, meta)
    return work


def test_repetition_penalty_matches_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0]])
    got = penalised(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 4]], [[1, 1]])
    # prompt token 0 (positive: / 2), output token 1 (negative: * 2), token 4 is 0; 2 and 3 unseen.
    assert got.tolist() == [[1.0, -2.0, 0.5, 1.0, 0.0]]


def test_presence_and_frequency_penalties_use_output_only():
    logits = torch.zeros(1, 5)
    got = penalised(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [[4, 4]], [[1, 1, 2]])
    # token 1: twice -> -0.5 - 0.5; token 2: once -> -0.25 - 0.5; prompt token 4 untouched.
    assert got.tolist() == [[0.0, -1.0, -0.75, 0.0, 0.0]]


def test_penalties_compose_in_vllm_order_per_row():
    logits = torch.tensor([[4.0, -2.0, 1.0, 3.0]] * 3)
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5),
              SamplingParams(), SamplingParams(presence_penalty=-1.0)]
    prompts = [[3], [0, 1], [0]]
    outputs = [[0, 0, 1], [2], [2, 2, 99]]   # 99 is outside the vocab: ignored
    got = penalised(logits, params, prompts, outputs)
    # Row 0: repetition first (0: 4/2, 1: -2*2, 3: 3/2), then -1*count, then -0.5*[count>0].
    assert got[0].tolist() == [2.0 - 2.0 - 0.5, -4.0 - 1.0 - 0.5, 1.0, 1.5]
    assert got[1].tolist() == logits[1].tolist()               # no penalty on this row
    assert got[2].tolist() == [4.0, -2.0, 2.0, 3.0]            # negative presence rewards token 2


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0]])
    out = run(logits, [SamplingParams(temperature=0, frequency_penalty=1.0)], outputs=[[0]])
    assert out.sampled_token_ids.item() == 1


# ---- seeds ---------------------------------------------------------------------------------------

def test_seeded_rows_independent_of_batch_order_and_other_seeds():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 1000, generator=gen) * 2
    params = [SamplingParams(temperature=1.0, seed=42), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=5, seed=9)]
    outputs = [[7, 8], [1], [], [2, 2, 2]]
    alone = [run(rows[i:i + 1], [params[i]], outputs=[outputs[i]]).sampled_token_ids.item() for i in (0, 1, 3)]
    order = [3, 2, 0, 1]
    for _ in range(3):   # the shared generator advances between calls; seeded rows do not care
        together = run(rows[order], [params[i] for i in order], outputs=[outputs[i] for i in order])
        got = dict(zip(order, together.sampled_token_ids.tolist()))
        assert [got[0], got[1], got[3]] == alone
    # Another seed on a neighbour does not move row 0.
    other = [params[0], SamplingParams(temperature=0.7, seed=123)]
    assert run(rows[:2], other, outputs=outputs[:2]).sampled_token_ids[0].item() == alone[0]


def test_seeded_stream_is_a_function_of_seed_and_position():
    row = torch.zeros(1, 1000)   # uniform: every draw is informative

    def stream(seed):
        return [run(row, [SamplingParams(temperature=1.0, seed=seed)], outputs=[[0] * k]).sampled_token_ids.item()
                for k in range(20)]

    a = stream(42)
    assert a == stream(42)                 # recompute after preemption: same positions, same tokens
    assert len(set(a)) > 10                # positions differ
    assert a != stream(43)                 # seeds differ
    assert seeded_uniform(-1, 0) != seeded_uniform(2 ** 64 - 2, 0)


def test_unseeded_rows_use_the_sampler_generator():
    row = torch.zeros(8, 1000)
    params = [SamplingParams(temperature=1.0)] * 8
    first = run(row, params, sampler=Sampler(seed=5)).sampled_token_ids
    assert torch.equal(first, run(row, params, sampler=Sampler(seed=5)).sampled_token_ids)
    sampler = Sampler(seed=5)
    run(row, params, sampler=sampler)
    assert not torch.equal(first, run(row, params, sampler=sampler).sampled_token_ids)


# ---- min_tokens ----------------------------------------------------------------------------------

def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(4, 10)
    logits[:, EOS] = 100.0
    logits[:, 7] = 50.0
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7]),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7], ignore_eos=True),
              SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[7], seed=0)]
    out = run(logits, params, outputs=[[1], [1], [1], [1, 1]]).sampled_token_ids.tolist()
    assert out[0] not in (EOS, 7)
    assert out[1] == EOS
    assert out[2] == EOS             # ignore_eos: EOS is an ordinary token, only stop ids are banned
    assert out[3] not in (EOS, 7)
    # Once min_tokens outputs exist, nothing is banned.
    assert run(logits[:1], params[:1], outputs=[[1, 1]]).sampled_token_ids.item() == EOS


# ---- logprobs ------------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_and_ordered():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5, top_k=3),
              SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=2)]
    out = run(logits, params, prompts=[[1, 2], [], []], outputs=[[4], [], []])
    ref = torch.log_softmax(logits, -1)
    for row in (0, 2):
        token = out.sampled_token_ids[row]
        assert torch.allclose(out.logprobs[row], ref[row, token])
        assert torch.allclose(out.top_logprobs[row], ref[row].topk(5).values)
        assert out.top_logprob_ids[row].tolist() == ref[row].topk(5).indices.tolist()
    assert (out.top_logprobs[0][:-1] >= out.top_logprobs[0][1:]).all()
    assert out.logprobs[1].isnan() and (out.top_logprob_ids[1] == -1).all()


def test_zero_logprobs_returns_only_the_sampled_token():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(4))
    out = run(logits, [SamplingParams(temperature=0, logprobs=0)] * 2)
    assert out.top_logprobs.shape == (2, 0)
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1).max(dim=-1).values)


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-2), dict(n=0),
                                    dict(max_tokens=0), dict(min_p=1.5), dict(logprobs=100), dict(stop=[""]),
                                    dict(presence_penalty=3.0), dict(repetition_penalty=0.0),
                                    dict(min_tokens=5, max_tokens=2), dict(seed=1.5)])
def test_invalid_params_raise(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)
