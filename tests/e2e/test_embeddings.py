"""/v1/embeddings, /v1/classify and /v1/score on a real `scaleinfer serve all-minilm-l6-v2` process, driven
by the official openai client (float and base64) and raw HTTP for the vLLM routes and the bad inputs."""
from __future__ import annotations

import base64
import concurrent.futures
import struct

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.e2e.conftest import TIMEOUT_S  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "all-minilm-l6-v2"
TEXTS = ["The cat sits on the mat.", "今天天气很好", "A kitten rests on a rug.", "Quarterly tax filing deadlines"]


@pytest.fixture(scope="module")
def emb_server(start_server):
    with start_server("--model", MODEL, "--max-num-batched-tokens", "64") as s:
        yield s


@pytest.fixture(scope="module")
def oai(emb_server):
    return openai.OpenAI(base_url=emb_server.v1, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def local():
    from scaleinfer import LLM

    return LLM(MODEL)


def _floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def _close(a, b, tol=1e-5):
    return max(abs(x - y) for x, y in zip(a, b)) < tol


def test_openai_client_float_and_base64(oai, local):
    expected = [o.outputs.embedding for o in local.embed(TEXTS)]
    for fmt in ("float", "base64"):
        res = oai.embeddings.create(model=MODEL, input=TEXTS, encoding_format=fmt)
        assert [d.index for d in res.data] == list(range(len(TEXTS)))
        got = [d.embedding if fmt == "float" else _floats(d.embedding) for d in res.data]   # base64 asked: raw
        assert all(_close(g, e) for g, e in zip(got, expected))
        assert res.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in local.embed(TEXTS))
    one = oai.embeddings.create(model=MODEL, input=TEXTS[0])          # one string; the client's default format
    assert len(one.data) == 1 and _close(one.data[0].embedding, expected[0])
    ids = local.embed(TEXTS[1])[0].prompt_token_ids
    by_ids = oai.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    assert _close(by_ids.data[0].embedding, expected[1])
    assert oai.models.list().data[0].id == MODEL


def test_concurrent_requests_are_batched_correctly(oai, local):
    expected = {t: local.embed(t)[0].outputs.embedding for t in TEXTS}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        jobs = [(t, pool.submit(oai.embeddings.create, model=MODEL, input=t, encoding_format="float"))
                for t in TEXTS * 4]
        for text, job in jobs:
            assert _close(job.result().data[0].embedding, expected[text])


def test_score_and_classify_routes(emb_server, local):
    r = httpx.post(emb_server.v1 + "/score", json={"model": MODEL, "text_1": TEXTS[0], "text_2": TEXTS[1:]},
                   timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    assert scores == pytest.approx([o.outputs.score for o in local.score(TEXTS[0], TEXTS[1:])], abs=1e-5)
    assert scores[1] == max(scores)    # the kitten is closest to the cat
    r = httpx.post(emb_server.v1 + "/classify", json={"model": MODEL, "input": "hi"}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and "classification" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, words", [
    ({"input": []}, "empty list"),
    ({"input": ""}, "empty"),
    ({"input": 5}, "input"),
    ({"input": [1.5, 2]}, "input"),
    ({"input": "word " * 400}, "truncate_prompt_tokens"),
    ({"input": [[999999]]}, "vocabulary"),
    ({"input": "hi", "dimensions": 64}, "matryoshka"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "hi", "model": "gpt-17"}, "does not exist"),
])
def test_bad_input_is_a_4xx_openai_error(emb_server, body, words):
    r = httpx.post(emb_server.v1 + "/embeddings", json={"model": MODEL, **body}, timeout=TIMEOUT_S)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]


def test_openai_client_raises_bad_request(oai):
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model=MODEL, input=[])


def test_truncation_option(emb_server):
    r = httpx.post(emb_server.v1 + "/embeddings", timeout=TIMEOUT_S,
                   json={"model": MODEL, "input": "word " * 400, "truncate_prompt_tokens": -1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256


def test_generate_model_refuses_embeddings(server):
    r = httpx.post(server.v1 + "/embeddings", json={"input": "hi"}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and "encoder model" in r.json()["error"]["message"]
