"""all-MiniLM-L6-v2 and all-mpnet-base-v2 (the catalog's real weights) vs sentence-transformers on the same
directory: cosine >= 0.9999 on English, Chinese and mixed inputs, batched (under a small token budget, so
several packed batches) and one at a time; plus score() and truncation."""
from __future__ import annotations

import pytest
import torch

st = pytest.importorskip("sentence_transformers")

from scaleinfer import LLM, catalog  # noqa: E402
from scaleinfer.errors import RequestError  # noqa: E402

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Semantic search finds documents by meaning rather than by keywords.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "I had 拉面 for lunch in 东京, it was great!",
    "Hi",
    "A much longer sentence that goes on and on, " * 6 + "until it finally ends.",
]


@pytest.fixture(scope="module", params=["all-minilm-l6-v2", "all-mpnet-base-v2"])
def pair(request):
    path = catalog.resolve(request.param)
    return LLM(request.param, max_num_batched_tokens=64), st.SentenceTransformer(path, device="cpu")


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1)


def test_batched_and_alone_match_sentence_transformers(pair):
    llm, ref = pair
    expected = ref.encode(TEXTS, convert_to_tensor=True)
    batched = [o.outputs.embedding for o in llm.embed(TEXTS)]
    assert _cos(batched, expected).min() >= 0.9999
    for text, exp in zip(TEXTS, expected):
        (alone,) = llm.embed(text)
        assert _cos([alone.outputs.embedding], exp[None]).item() >= 0.9999
    assert all(abs(torch.tensor(e).norm().item() - 1) < 1e-4 for e in batched)   # the Normalize module


def test_token_ids_and_score(pair):
    llm, ref = pair
    ids = llm.embed(TEXTS[0])[0].prompt_token_ids
    assert llm.embed([ids])[0].outputs.embedding == pytest.approx(llm.embed(TEXTS[0])[0].outputs.embedding, abs=1e-6)
    scores = [o.outputs.score for o in llm.score(TEXTS[2], [TEXTS[3], TEXTS[0]])]
    emb = ref.encode([TEXTS[2], TEXTS[3], TEXTS[0]], convert_to_tensor=True)
    assert scores == pytest.approx(_cos(emb[1:], emb[0][None]).tolist(), abs=1e-4)


def test_too_long_errors_unless_truncated(pair):
    llm, ref = pair
    long = "word " * 600
    with pytest.raises(RequestError, match="truncate_prompt_tokens"):
        llm.embed(long)
    (out,) = llm.embed(long, truncate_prompt_tokens=-1)
    assert len(out.prompt_token_ids) == ref.max_seq_length
    assert _cos([out.outputs.embedding], ref.encode([long], convert_to_tensor=True)).item() >= 0.9999
