"""Perplexity arithmetic on a fake model: uniform logits give perplexity = vocab size; a model that
always predicts the right token gives 1; windows never overlap and BOS is never scored."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scaleinfer.bench.perplexity import perplexity, windows_of


class _Tok:
    def __init__(self, add_bos: bool):
        self.add_bos_token, self.bos_token_id = add_bos, 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + (ord(c) % 7) for c in text]


def _llm(logits_fn, add_bos=False):
    seen = []

    def compute_logits(ids):
        seen.append(list(ids))
        return logits_fn(ids)

    return SimpleNamespace(tokenizer=_Tok(add_bos), engine=SimpleNamespace(executor=SimpleNamespace(
        compute_logits=compute_logits))), seen


def test_windows_do_not_overlap_and_drop_single_tokens():
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows_of(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows_of(list(range(10)), 4, max_windows=1) == [[0, 1, 2, 3]]


def test_uniform_logits_give_vocab_size():
    llm, _ = _llm(lambda ids: torch.zeros(len(ids), 11))
    result = perplexity(llm, "abcdefghij" * 5, window=8)
    assert result.perplexity == pytest.approx(11.0, rel=1e-5)
    assert result.num_tokens == 50 - 7 and result.num_windows == 7   # 6 full windows of 8 + one of 2


@pytest.mark.parametrize("add_bos", [False, True])
def test_perfect_predictions_give_one_and_bos_is_not_scored(add_bos):
    def oracle(ids):
        logits = torch.full((len(ids), 9), -1e4)
        for i in range(len(ids) - 1):
            logits[i, ids[i + 1]] = 0.0
        return logits

    llm, seen = _llm(oracle, add_bos)
    result = perplexity(llm, "hello world", window=4)
    assert result.perplexity == pytest.approx(1.0)
    assert all(s[0] == 0 for s in seen) == add_bos
