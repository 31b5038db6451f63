"""The router against fake replicas (router_fakes.py): routing by policy, retry before any response byte,
an error event when a replica fails mid-stream, 503 when none is up, rejoin after a health check, the
API key at the router and the replicas' own key, per-replica /metrics. No model weights; seconds."""
from __future__ import annotations

import asyncio
import json

import httpx
from tests.distributed.router_fakes import cluster, replica_up, wait_for

TIMEOUT = httpx.Timeout(60)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def complete(client, url, prompt="hello", stream=False, **kw):
    return await client.post(url + "/v1/completions", json={"prompt": prompt, "stream": stream}, **kw)


def test_round_robin_alternates_and_passes_streams_and_other_routes_through():
    async def main():
        async with cluster(2, "round-robin") as (url, fakes), httpx.AsyncClient(timeout=TIMEOUT) as c:
            got = [(await complete(c, url)).json()["replica"] for _ in range(4)]
            assert got == ["fake0", "fake1", "fake0", "fake1"]
            r = await complete(c, url, stream=True)
            assert r.headers["content-type"].startswith("text/event-stream")
            assert [e if e == "[DONE]" else e["i"] for e in events(r.text)] == [0, 1, 2, "[DONE]"]
            assert (await c.get(url + "/v1/models")).json()["data"][0]["id"] == "fake"
            assert (await c.get(url + "/health")).json() == {"status": "ok", "replicas_up": 2, "replicas": 2}
    run(main())


def test_a_refused_connection_is_retried_on_another_replica_and_the_replica_leaves_rotation():
    async def main():
        async with cluster(2, "round-robin", health_interval_s=3600) as (url, fakes), \
                httpx.AsyncClient(timeout=TIMEOUT) as c:
            await fakes[0].stop()   # the health check (hourly here) has not noticed: the request finds out
            for _ in range(3):
                r = await complete(c, url)
                assert r.status_code == 200 and r.json()["replica"] == "fake1"
            metrics = (await c.get(url + "/metrics")).text
            assert 'scaleinfer_router_replica_up{replica="r0"} 0.0' in metrics
            assert 'scaleinfer_router_retries_total{replica="r0"} 1.0' in metrics
    run(main())


def test_a_replica_that_dies_mid_stream_ends_the_stream_with_an_error_event():
    async def main():
        async with cluster(1) as (url, fakes), httpx.AsyncClient(timeout=TIMEOUT) as c:
            r = await complete(c, url, "DIE", stream=True)
            got = events(r.text)
            assert r.status_code == 200 and got[0] == {"replica": "fake0", "i": 0}
            assert got[1]["error"]["code"] == "replica_failed" and "mid-stream" in got[1]["error"]["message"]
            assert got[-1] == "[DONE]"
    run(main())


def test_requests_on_a_replica_that_leaves_rotation_are_retried_or_cut_never_left_hanging():
    async def main():
        async with cluster(3, "round-robin") as (url, fakes), httpx.AsyncClient(timeout=TIMEOUT) as c:
            hang = asyncio.ensure_future(complete(c, url, "HANG:fake0"))            # r0: no byte answered yet
            stall = asyncio.ensure_future(complete(c, url, "STALL", stream=True))   # r1: mid-stream
            await wait_for(lambda: _served(fakes, 2), "the fakes did not get both requests")
            fakes[0].healthy = fakes[1].healthy = False   # both fail their health checks (alive, but stuck)
            r = await hang                                # retried on r2, the one left
            assert r.status_code == 200 and r.json()["replica"] == "fake2"
            got = events((await stall).text)
            assert got[0]["replica"] == "fake1" and got[-2]["error"]["code"] == "replica_failed"
            assert "left rotation mid-stream" in got[-2]["error"]["message"] and got[-1] == "[DONE]"
    run(main())


async def _served(fakes, n: int) -> bool:
    return sum(f.served for f in fakes) >= n


async def _all_down(c, url) -> bool:
    return (await c.get(url + "/health")).status_code == 503


def test_all_replicas_down_is_503_with_each_reason_and_a_replica_that_comes_back_rejoins():
    async def main():
        async with cluster(2) as (url, fakes), httpx.AsyncClient(timeout=TIMEOUT) as c:
            for f in fakes:
                await f.stop()
            await wait_for(lambda: _all_down(c, url), "/health stayed 200 with every replica stopped")
            r = await complete(c, url)
            err = r.json()["error"]
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and err["code"] == "no_replica"
            assert "r0: " in err["message"] and "r1: " in err["message"] and "refused" in err["message"]
            await fakes[1].start()   # the same port again
            await wait_for(lambda: _is_up(c, url, "r1"), "r1 did not rejoin")
            assert (await complete(c, url)).json()["replica"] == "fake1"
    run(main())


async def _is_up(c, url, name) -> bool:
    return await replica_up(c, url, name) == 1.0


def test_the_router_checks_the_client_key_and_sends_the_replicas_their_own():
    async def main():
        async with cluster(2, api_key="outer", replica_auth={"Authorization": "Bearer inner"}) as (url, fakes), \
                httpx.AsyncClient(timeout=TIMEOUT) as c:
            assert (await complete(c, url)).status_code == 401
            assert (await c.get(url + "/health")).status_code == 200   # probes need no key
            ok = await complete(c, url, headers={"Authorization": "Bearer outer"})
            assert ok.status_code == 200
            assert [a for f in fakes for a in f.auth] == ["Bearer inner"]
    run(main())


def test_disable_docs_is_applied_at_the_router():
    async def main():
        async with cluster(1, enable_docs=False) as (url, fakes), httpx.AsyncClient(timeout=TIMEOUT) as c:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert (await c.get(url + path)).status_code == 404
            assert (await c.get(url + "/v1/models")).status_code == 200
    run(main())


def test_metrics_show_each_replica_and_the_router_counters():
    async def main():
        async with cluster(2) as (url, fakes), httpx.AsyncClient(timeout=TIMEOUT) as c:
            for _ in range(3):
                await complete(c, url)
            text = (await c.get(url + "/metrics")).text
            assert 'fake_served{replica="r0"} 2' in text and 'fake_served{replica="r1"} 1' in text
            assert text.count("# TYPE fake_served gauge") == 1
            assert 'scaleinfer_router_requests_total{reason="round_robin",replica="r0"} 2.0' in text
            assert 'scaleinfer_router_http_requests_total{route="/v1/completions",status="200"} 3.0' in text
    run(main())
