"""Perplexity (bench/perplexity.py) on the real default model: scoring token by token through the paged
cache (decode steps, the runner's decode program) equals scoring one prefill per window. (The
arithmetic on a fake model: tests/unit/bench/test_perplexity.py.)"""
from __future__ import annotations

import pytest

from scaleinfer.bench.perplexity import perplexity


@pytest.mark.slow
def test_decode_path_scoring_equals_window_scoring_on_the_real_model():
    """--step 1 feeds tokens one at a time through the paged cache (the decode kernels); in fp32 it
    scores the same text as one prefill per window, up to float summation order."""
    from scaleinfer import LLM

    llm = LLM("smollm2-135m-instruct", quantization="none", kv_cache_memory="64MiB", max_model_len=256)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3
    whole = perplexity(llm, text, window=48, max_windows=2)
    stepped = perplexity(llm, text, window=48, max_windows=2, step=1)
    assert stepped.num_tokens == whole.num_tokens > 40
    assert stepped.perplexity == pytest.approx(whole.perplexity, rel=1e-3)
