"""One soak request over HTTP: send a drawn SoakRequest, read (or cut) the answer, record an Outcome.

A failed request is a data point, never an exception: transport errors land in Outcome.error.
Oversized bodies go over a plain socket that watches for an answer while it uploads: a server may
answer 413 and close before it has read the body, and httpx would report only the broken upload.
"""
from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from scaleinfer.bench.soak.mix import CHAT, SoakRequest

_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Outcome:
    kind: str
    endpoint: str
    stream: bool
    start: float
    """Seconds since the run began when the request was sent."""
    status: int | None = None
    """HTTP status; None when no response came (transport error, or cut before the headers)."""
    in_band_error: str | None = None
    """'type:code' of an error event inside a 200 stream."""
    disconnected: bool = False
    """The client cut the request (as drawn) before it finished."""
    done: bool = False
    """The answer was complete: [DONE] seen, or a JSON body with choices."""
    ttft: float | None = None
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""

    @property
    def is_5xx(self) -> bool:
        if self.status is not None and self.status >= 500:
            return True
        kind, _, code = (self.in_band_error or ":").partition(":")
        return kind in ("internal_error", "service_unavailable") or code.startswith("5")


def _has_text(chunk: dict, chat: bool) -> bool:
    for choice in chunk.get("choices") or []:
        if ((choice.get("delta") or {}).get("content") if chat else choice.get("text")):
            return True
    return False


def _take_usage(out: Outcome, body: dict) -> None:
    usage = body.get("usage") or {}
    out.prompt_tokens = usage.get("prompt_tokens") or out.prompt_tokens
    out.completion_tokens = usage.get("completion_tokens") or out.completion_tokens


async def _read_stream(client: httpx.AsyncClient, url: str, req: SoakRequest, out: Outcome, t0: float) -> None:
    chat = req.endpoint == CHAT
    async with client.stream("POST", url, content=req.body, headers=_HEADERS) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.error = (await r.aread()).decode(errors="replace")[:200]
            return
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out.done = True
                return
            events += 1
            chunk = json.loads(data)
            if "error" in chunk:
                err = chunk["error"] or {}
                out.in_band_error = f"{err.get('type')}:{err.get('code')}"
                out.error = str(err.get("message"))[:200]
            elif out.ttft is None and _has_text(chunk, chat):
                out.ttft = time.perf_counter() - t0
            _take_usage(out, chunk)
            if req.disconnect_after_events is not None and events >= req.disconnect_after_events:
                out.disconnected = True
                return  # leaving the block closes the connection mid-stream


async def _read_whole(client: httpx.AsyncClient, url: str, req: SoakRequest, out: Outcome) -> None:
    post = client.post(url, content=req.body, headers=_HEADERS)
    if req.disconnect_after_s is None:
        r = await post
    else:
        try:
            r = await asyncio.wait_for(post, req.disconnect_after_s)
        except asyncio.TimeoutError:
            out.disconnected = True
            return
    out.status = r.status_code
    try:
        body = r.json()
    except ValueError:
        out.error = f"not JSON: {r.text[:200]!r}"
        return
    if r.status_code != 200:
        out.error = str((body.get("error") or {}).get("message", body))[:200] if isinstance(body, dict) else ""
        return
    out.done = bool(body.get("choices"))
    _take_usage(out, body)


def _raw_post(url: str, body: bytes, timeout_s: float) -> tuple[int | None, str]:
    """POST body to url on a fresh connection, stopping the upload as soon as the server answers;
    returns (status or None, the start of the answer or the error)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    data, sent, answer = memoryview(head + body), 0, b""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        try:
            while sent < len(data) and not select.select([sock], [], [], 0)[0]:
                sent += sock.send(data[sent:sent + (1 << 16)])
        except OSError:  # the server closed on us: its answer may still be in the socket
            pass
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except OSError as exc:
            if not answer:
                return None, f"{type(exc).__name__}: {exc} after sending {sent} of {len(data)} bytes"
    if not answer.startswith(b"HTTP/1."):
        return None, f"no HTTP answer after sending {sent} of {len(data)} bytes"
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2][:200].decode(errors="replace")


async def _send_raw(url: str, req: SoakRequest, out: Outcome, timeout_s: float) -> None:
    out.status, text = await asyncio.to_thread(_raw_post, url, req.body, timeout_s)
    if out.status != 200:
        out.error = text
    else:
        out.done = True


async def send(client: httpx.AsyncClient, base_url: str, req: SoakRequest, run_start: float) -> Outcome:
    """Send one request; run_start (time.perf_counter() at the run's start) dates it."""
    t0 = time.perf_counter()
    out = Outcome(req.kind, req.endpoint, req.stream, t0 - run_start)
    try:
        if req.kind == "oversized_body":
            await _send_raw(base_url + req.endpoint, req, out, client.timeout.read or 300.0)
        elif req.stream:
            await _read_stream(client, base_url + req.endpoint, req, out, t0)
        else:
            await _read_whole(client, base_url + req.endpoint, req, out)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    out.latency = time.perf_counter() - t0
    return out
