"""The router's ASGI app: /health and /metrics of its own; every other request is forwarded to a replica
(completions and chat chosen by the policy, the rest in turn) and its response passed through (a stream
chunk by chunk as it comes, anything else whole), with the replica's name in `x-scaleinfer-replica`.

Failures:
- a replica that refuses the connection, drops it before answering, or answers 503 (shutting down,
  engine dead): the request goes to another replica (nothing was sent to the client yet);
- a replica that fails or leaves rotation mid-stream: the stream ends with an OpenAI error event
  (code "replica_failed") and `data: [DONE]`;
- no replica left to try: 503 with the reason of each replica;
- a replica silent for --replica-timeout seconds: 504 (or an error event mid-stream);
- a client that goes away: the upstream request is closed, so the replica aborts it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import httpx

from scaleinfer.serving.generation import error_body, sse
from scaleinfer.serving.router.info import route_info
from scaleinfer.serving.router.metrics import CONTENT_TYPE
from scaleinfer.serving.router.policies import RoundRobin, RouteInfo
from scaleinfer.serving.router.replicas import Replica, ReplicaSet

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
DOC_PATHS = frozenset({"/docs", "/redoc", "/openapi.json"})
"""Not forwarded when the router runs with --disable-docs."""
_UPSTREAM_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer",
                            b"proxy-authorization", b"host", b"content-length"})
_DOWNSTREAM_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date"})
RETRY, DONE = "retry", "done"


class _Progress:
    """What of the response the client already has."""

    def __init__(self) -> None:
        self.started = False
        self.tail = b""
        self.failure = ""
        """Why the try failed before the client got anything (for the 503 if no replica is left)."""


class RouterApp:
    def __init__(self, replicas: ReplicaSet, health_interval_s: float, metrics_timeout_s: float = 5.0,
                 enable_docs: bool = True):
        self.replicas, self.metrics = replicas, replicas.metrics
        self.blocked = frozenset() if enable_docs else DOC_PATHS
        self.health_interval_s, self.metrics_timeout_s = health_interval_s, metrics_timeout_s
        self._others = RoundRobin()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return None
        path, method = scope["path"], scope["method"]
        if path == "/health" and method in ("GET", "HEAD"):
            return await self._health(send)
        if path == "/metrics" and method == "GET":
            return await self._metrics(send)
        if path in self.blocked:
            return await _send_json(send, 404, error_body("Not Found", code="not_found"))
        body = await _read_body(receive)
        if body is None:
            return None  # the client left
        info = route_info(path, body) if method == "POST" and path in GENERATION_PATHS else None
        await self._forward(scope, receive, send, body, info)

    async def _lifespan(self, receive, send) -> None:
        loop = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.replicas.check_all()
                loop = asyncio.ensure_future(self.replicas.health_loop(self.health_interval_s))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if loop is not None:
                    loop.cancel()
                await self.replicas.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _health(self, send) -> None:
        up, total = len(self.replicas.healthy()), len(self.replicas.replicas)
        if up:
            return await _send_json(send, 200, {"status": "ok", "replicas_up": up, "replicas": total})
        await _send_json(send, 503, error_body(f"no replica is in rotation ({self.replicas.describe_down()})",
                                               "service_unavailable", code="no_replica"))

    async def _metrics(self, send) -> None:
        async def scrape(replica: Replica) -> tuple[str, str | None]:
            try:
                r = await self.replicas.client.get(replica.url + "/metrics", headers=self.replicas.auth,
                                                   timeout=self.metrics_timeout_s)
                return replica.name, r.text if r.status_code == 200 else None
            except httpx.TransportError:
                return replica.name, None

        found = await asyncio.gather(*(scrape(r) for r in self.replicas.healthy()))
        body = self.metrics.render({name: text for name, text in found if text is not None})
        await _send_raw(send, 200, [(b"content-type", CONTENT_TYPE.encode())], body)

    # ---- forwarding --------------------------------------------------------------------------
    async def _forward(self, scope, receive, send, body: bytes, info: RouteInfo | None) -> None:
        tried: dict[str, str] = {}
        disconnect = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                picked = self._pick(info, tried)
                if picked is None:
                    return await self._unavailable(send, tried)
                replica, reason = picked
                progress = _Progress()
                if await self._attempt(replica, reason, scope, body, send, disconnect, info, progress) == DONE:
                    return None
                tried[replica.name] = progress.failure or replica.reason
                self.metrics.retries.labels(replica=replica.name).inc()
        finally:
            disconnect.cancel()

    def _pick(self, info: RouteInfo | None, tried: dict[str, str]) -> tuple[Replica, str] | None:
        candidates = [r for r in self.replicas.healthy() if r.name not in tried]
        if not candidates:
            return None
        policy = self._others if info is None else self.replicas.policy
        choice = policy.choose([r.load for r in candidates], info or RouteInfo())
        return next(r for r in candidates if r.load is choice.replica), choice.reason

    async def _unavailable(self, send, tried: dict[str, str]) -> None:
        self.metrics.unavailable.inc()
        reasons = {r.name: r.reason for r in self.replicas.replicas if not r.healthy}
        reasons.update(tried)
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
        if tried:
            why = f"no replica could take the request ({detail})"
        else:
            why = f"no replica is available: all {len(self.replicas.replicas)} are out of rotation ({detail})"
        await _send_json(send, 503, error_body(why + "; retry later", "service_unavailable", code="no_replica"),
                         [(b"retry-after", b"1")])

    async def _attempt(self, replica: Replica, reason: str, scope, body: bytes, send, disconnect: asyncio.Future,
                       info: RouteInfo | None, progress: _Progress) -> str:
        """One try on one replica, raced against the replica leaving rotation and the client leaving."""
        tokens = info.est_tokens if info is not None else 0
        self.metrics.routed.labels(replica=replica.name, reason=reason).inc()
        self.replicas.begin(replica, tokens)
        exchange = asyncio.ensure_future(self._exchange(replica, scope, body, send, progress))
        down = asyncio.ensure_future(replica.down.wait())
        try:
            done, _ = await asyncio.wait({exchange, down, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if exchange in done:
                try:
                    return exchange.result()
                except OSError:  # the client's connection broke while we wrote to it
                    return DONE
            exchange.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exchange
            if disconnect in done:
                return DONE
            if not progress.started:
                progress.failure = f"left rotation before answering ({replica.reason})"
                return RETRY
            await self._cut_stream(send, progress, replica, f"replica {replica.name} left rotation mid-stream "
                                                            f"({replica.reason})")
            return DONE
        finally:
            down.cancel()
            self.replicas.end(replica, tokens)

    async def _exchange(self, replica: Replica, scope, body: bytes, send, progress: _Progress) -> str:
        client = self.replicas.client
        query = scope.get("query_string") or b""
        url = replica.url + scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        request = client.build_request(scope["method"], url, content=body,
                                       headers=_upstream_headers(scope["headers"], self.replicas.auth))
        try:
            response = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.WriteError) as exc:
            progress.failure = f"{type(exc).__name__} before answering: {exc}"
            self.replicas.mark_down(replica, progress.failure)
            return RETRY
        except httpx.PoolTimeout:
            await _send_json(send, 503, error_body("the router has no free connection to a replica; retry later",
                                                   "service_unavailable", code="router_busy"))
            return DONE
        except httpx.TimeoutException:
            await _send_json(send, 504, error_body(f"replica {replica.name} did not answer in time "
                                                   f"(--replica-timeout)", "service_unavailable", code="timeout"))
            return DONE
        try:
            if response.status_code == 503:   # shutting down or its engine died: nothing started there
                progress.failure = "answered 503 (shutting down or its engine stopped)"
                return RETRY
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                return await self._pass_stream(replica, response, send, progress)
            return await self._pass_whole(replica, response, send, progress)
        finally:
            await response.aclose()

    async def _pass_whole(self, replica: Replica, response: httpx.Response, send, progress: _Progress) -> str:
        try:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
        except httpx.TransportError as exc:
            progress.failure = f"the connection broke before the response was whole: {exc}"
            self.replicas.mark_down(replica, progress.failure)
            return RETRY
        progress.started = True
        await _send_raw(send, response.status_code, _downstream_headers(response, replica), data)
        return DONE

    async def _pass_stream(self, replica: Replica, response: httpx.Response, send, progress: _Progress) -> str:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _downstream_headers(response, replica)})
        progress.started = True
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                progress.tail = (progress.tail + chunk)[-2:]
        except httpx.TransportError as exc:
            if not isinstance(exc, httpx.TimeoutException):
                self.replicas.mark_down(replica, f"the connection broke mid-stream: {exc}")
            await self._cut_stream(send, progress, replica, f"replica {replica.name} failed mid-stream "
                                                            f"({type(exc).__name__}: {exc})")
            return DONE
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return DONE

    async def _cut_stream(self, send, progress: _Progress, replica: Replica, message: str) -> None:
        """End a stream the client has begun with an error event and [DONE]."""
        self.metrics.stream_errors.labels(replica=replica.name).inc()
        logger.warning("cut a stream: %s", message)
        event = error_body(f"{message}; the response is incomplete, retry the request", "service_unavailable",
                           code="replica_failed")
        head = b"" if progress.tail.endswith(b"\n\n") or not progress.tail else b"\n\n"
        await send({"type": "http.response.body", "body": head + (sse(event) + sse("[DONE]")).encode(),
                    "more_body": False})


def _upstream_headers(raw, auth: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones; its Authorization replaced by the replicas' key, if any."""
    out = [(k, v) for k, v in raw if k not in _UPSTREAM_DROP and not (auth and k == b"authorization")]
    return out + [(k.lower().encode(), v.encode()) for k, v in auth.items()]


def _downstream_headers(response: httpx.Response, replica: Replica) -> list[tuple[bytes, bytes]]:
    out = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _DOWNSTREAM_DROP]
    return out + [(b"x-scaleinfer-replica", replica.name.encode())]


async def _read_body(receive) -> bytes | None:
    """The whole request body (the Gate already bounded its size); None if the client left."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_raw(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await _send_raw(send, status, [(b"content-type", b"application/json"), *headers], json.dumps(payload).encode())
