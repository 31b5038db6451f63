"""HTTPS with a self-signed certificate made here by the openssl CLI, the API key from --api-key-file,
the docs turned off, and the request-head deadline (a half-sent head is closed after --header-timeout)."""
from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY = "tls-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=120)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(start_server, cert, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(KEY + "\n")
    with start_server("--ssl-certfile", cert[0], "--ssl-keyfile", cert[1], "--api-key-file", str(key_file),
                      "--disable-docs", "--header-timeout", str(HEADER_TIMEOUT_S), tls_cert=cert[0]) as s:
        yield s


@pytest.fixture(scope="module")
def trusting(cert):
    """An httpx client that trusts the test's certificate (and only it)."""
    with httpx.Client(verify=ssl.create_default_context(cafile=cert[0]), timeout=120) as c:
        yield c


def test_https_with_the_openai_client(tls_server, trusting):
    import openai

    assert tls_server.url.startswith("https://")
    client = openai.OpenAI(base_url=tls_server.v1, api_key=KEY, max_retries=0, http_client=trusting)
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tls_server.v1, api_key="wrong", max_retries=0, http_client=trusting).models.list()


def test_an_untrusted_client_and_plain_http_get_nothing(tls_server):
    with pytest.raises(httpx.ConnectError):  # certificate verify failed: nothing trusts a self-signed cert
        httpx.get(tls_server.url + "/health", timeout=60)
    with pytest.raises(httpx.TransportError):
        httpx.get(tls_server.url.replace("https://", "http://") + "/health", timeout=60)


def test_key_file_docs_off_and_health_open(tls_server, trusting):
    assert trusting.get(tls_server.url + "/health").status_code == 200
    assert trusting.get(tls_server.url + "/metrics").status_code == 401
    assert trusting.get(tls_server.url + "/metrics", headers=AUTH).status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert trusting.get(tls_server.url + path, headers=AUTH).status_code == 404, path
    assert "tls-test-key" not in tls_server.log()


def test_a_half_sent_request_head_is_closed_after_the_header_timeout(tls_server, cert):
    host, port = tls_server.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=cert[0])
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname=host) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            start = time.monotonic()
            try:
                data = sock.recv(1024)  # b"" once the server closes; socket.timeout (60 s) if it never does
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            assert data == b"", data
            assert time.monotonic() - start >= HEADER_TIMEOUT_S * 0.5  # it was the deadline, not a refusal
