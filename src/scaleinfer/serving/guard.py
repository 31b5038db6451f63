"""The ASGI gate every request passes before a route: the head size, request smuggling (Content-Length
with Transfer-Encoding), the API key, the body size limit; and the response count by route and status.

A pure ASGI middleware, so streams and disconnects pass through untouched. A refusal that leaves the
body unread says `Connection: close`, so the server closes the connection instead of reading on.
"""
from __future__ import annotations

import hashlib
import hmac
import json

from scaleinfer.serving.generation import ServerState, error_body

OPEN_PATHS = frozenset({"/health"})
"""Paths served without the API key (probes)."""


class Gate:
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.config.api_key
        self._key_digest = None if key is None else hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._checked(scope, receive, send_counted)
        finally:
            self.state.metrics.record_http(scope["path"], status)

    async def _checked(self, scope, receive, send):
        headers = _headers(scope)
        head_limit = self.state.config.limits.max_header_bytes
        if _head_size(scope) > head_limit:  # h11 bounds only a head still coming in; this bounds a whole one
            return await _refuse(send, 431, f"the request head (line and headers) is over {head_limit} bytes "
                                            f"(--max-header-bytes); send fewer or smaller headers", close=True)
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return await _refuse(send, 400, "a request may not carry both Content-Length and Transfer-Encoding "
                                            "(RFC 9112 section 6.3); send one of them", close=True)
        if self._key_digest is not None and scope["path"] not in OPEN_PATHS and not self._key_ok(headers):
            return await _refuse(send, 401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", close=b"content-length" in headers or
                                 b"transfer-encoding" in headers)
        limit = self.state.config.limits.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _refuse(send, 400, f"Content-Length {length[:20]!r} is not a byte count", close=True)
            if int(length) > limit:
                return await _refuse(send, 413, _too_large(int(length), limit), close=True)
        elif b"transfer-encoding" in headers:
            body = await _read_body(receive, limit)
            if body is None:
                return None  # the client left
            if len(body) > limit:
                return await _refuse(send, 413, _too_large(len(body), limit, "at least "), close=True)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()  # equal lengths: compare_digest takes constant time
        return scheme.lower() == b"bearer" and hmac.compare_digest(digest, self._key_digest)


def _headers(scope) -> dict[bytes, bytes]:
    """Header name -> value; a repeated name keeps its last value (names are lower-case in ASGI)."""
    return dict(scope["headers"])


def _head_size(scope) -> int:
    """Bytes of the request line and headers as sent (give or take the HTTP version)."""
    line = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    return line + sum(len(k) + len(v) + 4 for k, v in scope["headers"])


def _too_large(size: int, limit: int, prefix: str = "") -> str:
    return (f"the request body is {prefix}{size} bytes, more than the {limit} this server takes "
            f"(--max-request-bytes); send a smaller request")


async def _refuse(send, status: int, message: str, code: str | None = None, close: bool = False) -> None:
    body = json.dumps(error_body(message, code=code or ("request_too_large" if status == 413 else None))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive, limit: int) -> bytes | None:
    """A body of unknown length, read until it ends or passes `limit` (then what was read: > limit)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that hands the app the body already read, then goes on with the real one."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
