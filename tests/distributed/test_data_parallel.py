"""`scaleinfer serve --data-parallel-size 2` on SmolLM2: two engine processes behind one endpoint. The
official openai client gets every answer (chat and completions, streaming and not) through the router's
API key; round-robin alternates the replicas (response header and per-replica /metrics); both replicas
give the same greedy text; SIGTERM stops the router and its replicas with exit code 0."""
from __future__ import annotations

import httpx
import psutil
import pytest
from tests.distributed.dp_procs import SMALL, TIMEOUT_S, launch, metric, stop, wait_ready

pytestmark = pytest.mark.slow
KEY = "dp-test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("dp") / "serve.log")
    p = launch("serve", [*SMALL, "--data-parallel-size", "2", "--threads", "2", "--router-policy", "round-robin",
                         "--api-key", KEY, "--log-interval", "60"], log)
    try:
        wait_ready(p)
        yield p
    finally:
        stop(p.proc)


@pytest.fixture(scope="module")
def client(dp):
    import openai

    return openai.OpenAI(base_url=dp.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)


def test_the_openai_client_gets_every_answer_through_the_router(client):
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content   # the other replica, the same greedy text
    kw = dict(model=model, prompt="The three primary colors are", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    assert whole and "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)) == whole


def test_round_robin_alternates_replicas_as_the_metrics_show(dp, client):
    before = httpx.get(dp.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S).text
    model = client.models.list().data[0].id
    seen = []
    for _ in range(4):
        raw = client.completions.with_raw_response.create(model=model, prompt="Hello", max_tokens=2)
        seen.append(raw.headers["x-scaleinfer-replica"])
    assert sorted(seen) == ["r0", "r0", "r1", "r1"] and seen[0] != seen[1]
    after = httpx.get(dp.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S).text
    for name in ("r0", "r1"):
        finished = (metric(after, "scaleinfer_request_finished_total", replica=name)
                    - metric(before, "scaleinfer_request_finished_total", replica=name))
        assert finished == 2, (name, finished)
        assert metric(after, "scaleinfer_router_replica_up", replica=name) == 1


def test_the_router_guards_with_the_key_and_replicas_are_not_open(dp):
    assert httpx.get(dp.url + "/v1/models", timeout=TIMEOUT_S).status_code == 401
    assert httpx.get(dp.url + "/health", timeout=TIMEOUT_S).json()["replicas_up"] == 2
    replicas = [c for c in psutil.Process(dp.proc.pid).children() if "serve" in c.cmdline()]
    assert len(replicas) == 2
    for r in replicas:   # each replica requires the router's internal key, not the client's
        port = r.cmdline()[r.cmdline().index("--port") + 1]
        url = f"http://127.0.0.1:{port}/v1/models"
        assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT_S).status_code == 401


def test_sigterm_stops_the_router_and_its_replicas(dp):
    children = psutil.Process(dp.proc.pid).children()
    assert stop(dp.proc) == 0, dp.log()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.pid for p in alive]
