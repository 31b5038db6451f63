"""/v1/completions beam-search extras (vLLM's use_beam_search / best_of / length_penalty): mapped onto
SamplingParams, bad combinations answered 400 with a message that names the field."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from scaleinfer.errors import RequestError
from scaleinfer.serving import openai as oai
from scaleinfer.serving.app import build_app
from scaleinfer.serving.generation import ServerConfig
from scaleinfer.serving.protocol import ChatCompletionRequest, CompletionRequest

from .fakes import FakeAsyncEngine


def test_beam_fields_map_to_sampling_params():
    req = CompletionRequest(prompt="x", n=2, best_of=4, use_beam_search=True, length_penalty=0.6)
    oai.refuse_unsupported(req)
    p = oai.sampling_params(req, 10, 100)
    assert p.use_beam_search and p.n == 2 and p.beam_width == 4 and p.length_penalty == 0.6
    assert p.temperature == 0.0   # the default under beam search
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=3, use_beam_search=True)
    assert oai.sampling_params(chat, 10, 100).beam_width == 3
    with pytest.raises(RequestError, match="use_beam_search"):
        oai.refuse_unsupported(CompletionRequest(prompt="x", best_of=3))


@pytest.mark.parametrize("body, word", [
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "n": 4, "best_of": 2}, "best_of"),
    ({"best_of": 3}, "best_of"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
])
def test_bad_beam_combinations_are_400(body, word):
    with TestClient(build_app(FakeAsyncEngine(), ServerConfig(served_model_name="tiny"))) as client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, **body})
    assert r.status_code == 400, r.text
    assert word in r.json()["error"]["message"]
