"""`scaleinfer router` in front of two plain `scaleinfer serve` replicas on SmolLM2 (the across-machines
layout, on localhost): prefix affinity keeps a shared prompt prefix on one replica; a replica killed
mid-load loses no request that had not started there (retried on the other), its streams end with an
error event, nothing hangs; with every replica down the router answers 503."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from tests.distributed.dp_procs import SMALL, TIMEOUT_S, launch, metric, stop, wait_ready

pytestmark = pytest.mark.slow
SYSTEM = ("You are a patient teacher of European history. Answer in one short sentence, name the century, "
          "and never invent facts. ") * 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("router")
    replicas = [launch("serve", [*SMALL, "--threads", "1", "--log-interval", "60"], str(d / f"r{i}.log"))
                for i in range(2)]
    router = launch("router", ["--policy", "prefix-affinity", "--health-interval", "0.5",
                               *[a for r in replicas for a in ("--replica", r.url)]], str(d / "router.log"))
    try:
        for p in (*replicas, router):
            wait_ready(p)
        deadline = time.monotonic() + TIMEOUT_S   # the router's next health check takes both in
        while httpx.get(router.url + "/health", timeout=TIMEOUT_S).json()["replicas_up"] < 2:
            assert time.monotonic() < deadline, router.log()
            time.sleep(0.1)
        yield router, replicas
    finally:
        for p in (router, *replicas):
            stop(p.proc)


def chat_body(question: str, system: str = SYSTEM, **kw) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0, **kw}


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica(cluster):
    router, _ = cluster
    with httpx.Client(base_url=router.url, timeout=TIMEOUT_S) as c:
        homes = {c.post("/v1/chat/completions", json=chat_body(q)).headers["x-scaleinfer-replica"]
                 for q in ("Who was Charlemagne?", "When did Rome fall?", "What was the Hanse?", "Who was Luther?")}
        assert len(homes) == 1
        others = {c.post("/v1/chat/completions", json=chat_body("Hello", system=f"{i} " * 40)).headers[
            "x-scaleinfer-replica"] for i in range(4)}
        assert others == {"r0", "r1"}   # new prefixes go by load, idle replicas in turn
        text = c.get("/metrics").text
    assert metric(text, "scaleinfer_router_requests_total", reason="prefix_hit") == 3


async def _one(client: httpx.AsyncClient, i: int, first_event: asyncio.Future) -> dict:
    """A streaming chat (i % 4 in 0, 1) or a non-streaming completion, each with a prefix of its own (so
    the policy spreads them by load); what the client got. `first_event` gets the replica of the first
    stream that receives an event."""
    body = chat_body(f"Tell me about year {1000 + 37 * i}.", system=f"Request {i}. {SYSTEM}", max_tokens=48,
                     stream=i % 4 < 2)
    path = "/v1/chat/completions"
    if i % 4 >= 2:
        body = {"prompt": f"{i}: The history of the year {1000 + 37 * i} is", "max_tokens": 48, "temperature": 0}
        path = "/v1/completions"
    async with client.stream("POST", path, json=body) as r:
        out = {"i": i, "status": r.status_code, "replica": r.headers.get("x-scaleinfer-replica"), "events": []}
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out["events"].append(data if data == "[DONE]" else json.loads(data))
                if not first_event.done():
                    first_event.set_result(out["replica"])
            elif line.strip():
                out["body"] = json.loads(line)
    return out


def test_killing_a_replica_mid_load_loses_no_unstarted_request_and_hangs_nothing(cluster):
    router, replicas = cluster

    async def main():
        async with httpx.AsyncClient(base_url=router.url, timeout=TIMEOUT_S) as client:
            loop = asyncio.get_running_loop()
            first_event = loop.create_future()
            first = [asyncio.ensure_future(_one(client, i, first_event)) for i in range(12)]
            victim = await asyncio.wait_for(first_event, TIMEOUT_S)   # a replica that is streaming
            replicas[int(victim[1:])].proc.kill()   # SIGKILL: no goodbye
            replicas[int(victim[1:])].proc.wait()
            later = [asyncio.ensure_future(_one(client, 100 + i, loop.create_future())) for i in range(6)]
            return victim, await asyncio.wait_for(asyncio.gather(*first), TIMEOUT_S), \
                await asyncio.wait_for(asyncio.gather(*later), TIMEOUT_S)

    victim, first, later = asyncio.run(main())
    for out in first + later:
        assert out["status"] == 200, out
        if "body" in out:   # not streamed: whole, wherever it ran (retried if its replica died first)
            assert out["body"]["choices"][0]["text"], out
            continue
        assert out["events"][-1] == "[DONE]", out
        errors = [e for e in out["events"] if isinstance(e, dict) and "error" in e]
        if errors:   # cut mid-stream: only where the killed replica was streaming it
            assert out["replica"] == victim and errors[0]["error"]["code"] == "replica_failed", out
        else:
            assert out["events"][-2]["choices"][0]["finish_reason"] in ("stop", "length"), out
    assert all(out["replica"] != victim for out in later)
    text = httpx.get(router.url + "/metrics", timeout=TIMEOUT_S).text
    assert metric(text, "scaleinfer_router_replica_up", replica=victim) == 0
    hit = {name: metric(text, f"scaleinfer_router_{name}_total", replica=victim)
           for name in ("retries", "stream_errors")}
    assert hit["stream_errors"] >= 1, f"the kill cut no stream: {hit}"
    print(f"in flight on {victim} when it was killed: {hit}")


def test_with_every_replica_down_the_router_answers_503(cluster):
    router, replicas = cluster
    for p in replicas:
        p.proc.kill()
        p.proc.wait()
    with httpx.Client(base_url=router.url, timeout=TIMEOUT_S) as c:
        r = c.post("/v1/chat/completions", json=chat_body("Anyone?"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica", r.text
        assert "r0" in r.json()["error"]["message"] and "r1" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503
