"""Sampler: greedy, temperature, top-k / top-p / min-p, penalties, seeds, min_tokens, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from scaleinfer.errors import RequestError
from scaleinfer.sampler import Sampler, SamplingMetadata
from scaleinfer.sampling_params import SamplingParams

EOS = 3


def run(logits, params, outputs=None, prompts=None, sampler=None):
    n = logits.shape[0]
    outputs = outputs or [[] for _ in range(n)]
    prompts = prompts or [[] for _ in range(n)]
    meta = SamplingMetadata.from_params(params, prompts, outputs, [p.seed for p in params], (EOS,), logits.shape[1])
    return (sampler or Sampler())(logits, meta)


def frequencies(logits_row, params, draws=20000):
    logits = logits_row.unsqueeze(0).repeat(draws, 1)
    tokens = run(logits, [params] * draws).sampled_token_ids
    return torch.bincount(tokens, minlength=logits.shape[1]).float() / draws


def test_greedy_is_argmax():
    logits = torch.randn(5, 100)
    out = run(logits, [SamplingParams(temperature=0)] * 5)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5])
    for t in (1.0, 0.5, 2.0):
        freq = frequencies(logits, SamplingParams(temperature=t))
        expected = torch.softmax(logits / t, -1)
        assert 0.5 * (freq - expected).abs().sum() < 0.02, (t, freq, expected)


def test_top_k_only_samples_the_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, 2.8, -5.0])
    freq = frequencies(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(freq.nonzero().flatten().tolist()) == {1, 3}
    expected = torch.softmax(torch.tensor([3.0, 2.9]), -1)
    assert abs(freq[1] - expected[0]) < 0.02


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    freq = frequencies(logits, SamplingParams(temperature=1.0, top_p=0.75))
    # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the nucleus is {0, 1}, renormalised.
    assert set(freq.nonzero().flatten().tolist()) == {0, 1}
    assert abs(freq[0] - 0.5 / 0.8) < 0.02


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([0.6, 0.3, 0.08, 0.02])
    freq = frequencies(probs.log(), SamplingParams(temperature=1.0, min_p=0.2))  # threshold 0.12
    assert set(freq.nonzero().flatten().tolist()) == {0, 1}


def test_repetition_penalty_matches_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    meta = SamplingMetadata.from_params([p], [[0]], [[1]], [None], (EOS,), 4)
    work = logits.clone()
    Sampler._apply_penalties(work, meta)
    assert work.tolist() == [[1.0, -2.0, 0.5, 1.0]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 5)
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    meta = SamplingMetadata.from_params([p], [[4, 4]], [[1, 1, 2]], [None], (EOS,), 5)
    Sampler._apply_penalties(logits, meta)
    # token 1: twice -> -0.5 - 0.5; token 2: once -> -0.25 - 0.5; prompt tokens are not penalised.
    assert logits.tolist() == [[0.0, -1.0, -0.75, 0.0, 0.0]]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0]])
    out = run(logits, [SamplingParams(temperature=0, frequency_penalty=1.0)], outputs=[[0]])
    assert out.sampled_token_ids.item() == 1


def test_seeded_rows_independent_of_batch_and_order():
    torch.manual_seed(0)
    row = torch.randn(1000)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = run(row.unsqueeze(0), [seeded], outputs=[[7, 8]]).sampled_token_ids.item()
    others = torch.randn(3, 1000)
    batch = torch.cat([others[:2], row.unsqueeze(0), others[2:]])
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, seed=1), seeded,
              SamplingParams(temperature=1.0, top_k=5)]
    outputs = [[], [1], [7, 8], []]
    for _ in range(3):
        assert run(batch, params, outputs=outputs).sampled_token_ids[2].item() == alone
    # A different seed or position gives a different stream.
    draws_a = [run(row.unsqueeze(0), [SamplingParams(temperature=1.0, seed=42)], outputs=[[0] * k])
               .sampled_token_ids.item() for k in range(20)]
    draws_b = [run(row.unsqueeze(0), [SamplingParams(temperature=1.0, seed=43)], outputs=[[0] * k])
               .sampled_token_ids.item() for k in range(20)]
    assert draws_a != draws_b and len(set(draws_a)) > 1


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(2, 10)
    logits[:, EOS] = 100.0
    logits[:, 7] = 50.0
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[7]), SamplingParams(temperature=0)]
    out = run(logits, params, outputs=[[1], [1]])
    assert out.sampled_token_ids.tolist()[0] not in (EOS, 7)
    assert out.sampled_token_ids.tolist()[1] == EOS


def test_logprobs_are_raw_log_softmax_and_ordered():
    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0)]
    out = run(logits, params)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1))
    assert torch.allclose(out.top_logprobs[0], ref[0].topk(5).values)
    assert (out.top_logprobs[0][:-1] >= out.top_logprobs[0][1:]).all()
    assert math.isclose(out.top_logprobs[0].exp().sum().item() <= 1.0, True)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-2), dict(n=0),
                                    dict(max_tokens=0), dict(min_p=1.5), dict(logprobs=100), dict(stop=[""]),
                                    dict(presence_penalty=3.0), dict(min_tokens=5, max_tokens=2)])
def test_invalid_params_raise(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)
