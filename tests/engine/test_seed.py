"""LLM(seed=N) seeds the sampling of requests without a seed of their own (EngineConfig.seed, as vLLM)."""
from __future__ import annotations

import pytest

from scaleinfer import LLM, SamplingParams

PROMPTS = ["Once upon a time", "The best thing about the sea is"]


def _texts(seed: int, request_seed: int | None = None) -> list[str]:
    llm = LLM("smollm2-135m-instruct", seed=seed, kv_cache_memory="32MiB", max_model_len=256)
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=request_seed)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def seed0() -> list[str]:
    return _texts(0)


def test_same_engine_seed_samples_the_same_text(seed0):
    assert _texts(0) == seed0


def test_another_engine_seed_samples_other_text(seed0):
    assert _texts(1) != seed0


def test_a_request_seed_wins_over_the_engine_seed():
    assert _texts(0, request_seed=7) == _texts(1, request_seed=7)
