"""The HTTP layer of the real server against an attacker, over raw sockets: request smuggling
(Content-Length with Transfer-Encoding), a body over the limit (413 unread), a head over the limit (431),
the connection cap, and a huge-but-allowed request that must not stall the other clients."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
MAX_CONNECTIONS = 5
READ_BOUND_S = 60.0
"""Longest a raw-socket read waits for the server (generous: a loaded machine)."""


@pytest.fixture(scope="module")
def guarded(start_server):
    with start_server("--max-connections", str(MAX_CONNECTIONS), "--max-header-bytes", "4KiB",
                      "--max-request-bytes", "3MiB") as s:
        yield s


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=READ_BOUND_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it stays open)."""
    data = b""
    deadline = time.monotonic() + READ_BOUND_S
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            break
        if not chunk:
            return data
        data += chunk
    pytest.fail(f"the server kept the connection open; it sent {data[:300]!r}")


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body (the connection may stay open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_content_length_with_transfer_encoding_is_400_and_the_smuggled_request_is_never_answered(guarded):
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body))
    with connect(guarded) as sock:
        sock.sendall(head + body)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # nothing answered the smuggled request
    assert b'"object":"list"' not in answer and b"Transfer-Encoding" in answer


def test_a_body_over_the_limit_is_413_before_it_is_sent(guarded):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    with connect(guarded) as sock:
        sock.sendall(head + b'{"prompt": "' + b"x" * 1000)  # 1 KB of the announced 100 MB
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    err = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert "--max-request-bytes" in err["message"]


def test_a_head_over_the_limit_is_431(guarded):
    with connect(guarded) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"y" * 10_000 + b"\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_connections_over_the_cap_are_refused_while_an_open_one_is_served(guarded):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    held = []
    try:
        first = connect(guarded)
        held.append(first)
        first.sendall(request)
        assert read_response(first).startswith(b"HTTP/1.1 200 ")
        for _ in range(MAX_CONNECTIONS - 1):  # fill the cap with half-sent heads, as a slowloris client does
            sock = connect(guarded)
            held.append(sock)
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        extra = connect(guarded)  # sends nothing: a refusal is the server's own doing, right away
        held.append(extra)
        answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        first.sendall(request)  # the client that came before the cap is still served
        assert read_response(first).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


def test_a_huge_allowed_request_does_not_stall_other_clients(guarded, http):
    text = "hello world, tokenize me. " * 110_000  # 2.9 MB: under --max-request-bytes, seconds to tokenize
    done = threading.Event()
    result = {}

    def big():
        result["r"] = httpx.post(guarded.url + "/tokenize", json={"prompt": text}, timeout=300)
        done.set()

    thread = threading.Thread(target=big, daemon=True)
    thread.start()
    answered = 0
    for _ in range(2000):  # bounded; normally ends when the big request does
        r = http.get(guarded.url + "/health")
        if done.is_set():
            break
        answered += r.status_code == 200
        time.sleep(0.01)
    thread.join(300)
    assert result["r"].status_code == 200 and result["r"].json()["count"] > 100_000
    assert answered >= 10, f"only {answered} /health answers while the big request was tokenized"
