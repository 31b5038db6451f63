"""The HTTP/1.1 connection guard under the app: uvicorn's h11 protocol plus three limits it lacks.

- a connection cap: one over --max-connections is answered 503 and closed at once;
- a head deadline: a request head (line + headers) must arrive whole within --header-timeout seconds of
  the connection opening or of the previous response, else the connection is closed (slowloris);
- a head size cap: a head over --max-header-bytes is answered 431 and closed (h11 enforces the size; we
  name the status).

Idle keep-alive connections are closed by uvicorn's own timeout_keep_alive.
"""
from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from scaleinfer.serving.limits import ServerLimits

logger = logging.getLogger(__name__)


def _raw_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with the limits above; `limits` is set on the subclass guarded_protocol() makes."""

    limits: ServerLimits = ServerLimits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            logger.warning("refused a connection: %d open (--max-connections %d)", len(self.connections) - 1,
                           self.limits.max_connections)
            transport.write(_raw_response(503, "Service Unavailable", "too many connections; retry later\n"))
            transport.close()
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the first bytes of a head on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_deadline()  # the head is in

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            logger.warning("refused a request head over %d bytes", self.limits.max_header_bytes)
            self.transport.write(_raw_response(431, "Request Header Fields Too Large",
                                               f"the request head is over {self.limits.max_header_bytes} bytes\n"))
            self.transport.close()
            return
        super().send_400_response(msg)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.limits.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection whose request head took over %.0f s", self.limits.header_timeout_s)
            self.transport.close()


def guarded_protocol(limits: ServerLimits) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn.Config(http=...) for these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
