"""Fake replicas (tiny Starlette apps under real uvicorn servers, in-process) and a real router in front of
them, all on 127.0.0.1 and free ports, for the router's failure tests without model weights.

A fake replica answers /health (200, or 503 when told to be unhealthy), /metrics, /v1/models and
/v1/completions: JSON {"replica": name}, or with "stream": three SSE events. The prompt steers it:
"DIE" raises after the first event (the connection breaks mid-stream), "HANG:<name>" makes replica
<name> wait forever before answering, "STALL" sends one event and then waits forever.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from scaleinfer.serving.router.server import RouterOptions, build_router_app

READY_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeReplica:
    name: str
    port: int = field(default_factory=free_port)
    healthy: bool = True
    served: int = 0
    auth: list[str | None] = field(default_factory=list)
    server: uvicorn.Server | None = None
    task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Starlette:
        async def health(request):
            return JSONResponse({"status": "ok"}, status_code=200 if self.healthy else 503)

        async def metrics(request):
            text = f"# HELP fake_served Served.\n# TYPE fake_served gauge\nfake_served {self.served}\n"
            return PlainTextResponse(text)

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "fake"}]})

        async def completions(request):
            body = await request.json()
            self.served += 1
            self.auth.append(request.headers.get("authorization"))
            prompt = body.get("prompt", "")
            if f"HANG:{self.name}" in prompt:
                await asyncio.sleep(3600)
            if body.get("stream"):
                return StreamingResponse(self._events(prompt), media_type="text/event-stream")
            return JSONResponse({"replica": self.name})

        return Starlette(routes=[Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
                                 Route("/v1/completions", completions, methods=["POST"])])

    async def _events(self, prompt: str):
        for i in range(3):
            yield f'data: {{"replica": "{self.name}", "i": {i}}}\n\n'
            await asyncio.sleep(0.01)
            if "DIE" in prompt:
                raise RuntimeError("the fake replica dies mid-stream")
            if "STALL" in prompt:
                await asyncio.sleep(3600)
        yield "data: [DONE]\n\n"

    async def start(self) -> None:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_config=None, lifespan="off")
        self.server = uvicorn.Server(config)
        self.task = asyncio.ensure_future(self.server.serve())
        await _until(lambda: self.server.started, f"fake replica {self.name} did not start")

    async def stop(self) -> None:
        """Gone: the port refuses connections, open connections are dropped."""
        self.server.should_exit = self.server.force_exit = True
        await self.task


async def _until(check, message: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def cluster(n: int = 2, policy: str = "round-robin", **options):
    """(router URL, fake replicas): a router with a fast health check in front of n fake replicas."""
    replicas = [FakeReplica(f"fake{i}") for i in range(n)]
    for r in replicas:
        await r.start()
    opts = RouterOptions(**{"policy": policy, "health_interval_s": 0.05, "replica_timeout_s": 30, **options})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_router_app([r.url for r in replicas], opts), host="127.0.0.1",
                                           port=port, log_config=None, lifespan="on"))
    task = asyncio.ensure_future(server.serve())
    await _until(lambda: server.started, "the router did not start")
    try:
        yield f"http://127.0.0.1:{port}", replicas
    finally:
        server.should_exit = True   # graceful: the lifespan's shutdown runs (closes the router's client)
        await task
        for r in replicas:
            if not r.task.done():
                await r.stop()


async def wait_for(check, message: str) -> None:
    """Poll an async check until true (bounded by READY_TIMEOUT_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.02)


async def replica_up(client: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await client.get(url + "/metrics")).text
    head = f'scaleinfer_router_replica_up{{replica="{name}"}}'
    line = next(line for line in text.splitlines() if line.startswith(head))
    return float(line.split()[-1])
