"""Limits and lifecycle on a server of its own: the API key from SCALEINFER_API_KEY (401 on every route
but /health), --max-waiting (429), and a graceful SIGTERM that ends in-flight streams properly and exits 0."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def limited(start_server):
    with start_server("--max-num-seqs", "1", "--max-waiting", "1", "--shutdown-timeout", "1",
                      env={"SCALEINFER_API_KEY": KEY}) as s:
        s.headers = AUTH
        yield s


def test_api_key(limited, http):
    import openai

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = http.post(limited.v1 + "/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert http.post(limited.v1 + "/chat/completions", json=body, headers=AUTH).status_code == 200
    assert http.get(limited.url + "/health").status_code == 200  # probes need no key
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert http.get(limited.url + path).status_code == 401, path
        assert http.get(limited.url + path, headers=AUTH).status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=limited.v1, api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=limited.v1, api_key=KEY).models.list().data


class Stream(threading.Thread):
    """A streaming completion read in the background; `events` counts the data lines seen."""

    def __init__(self, url: str, max_tokens: int = 300):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events, self.lines, self.status, self.error = 0, [], None, None
        self.stop = threading.Event()

    def run(self):
        body = {"prompt": "Tell a very long story.", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", self.url + "/completions", json=body, headers=AUTH, timeout=60) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events += 1
                        self.lines.append(line)
                    if self.stop.is_set():
                        return
        except httpx.HTTPError as exc:
            self.error = exc


def wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_full_is_429(limited, http):
    running = Stream(limited.v1)
    running.start()
    wait_until(lambda: running.events >= 2)  # it holds the only running slot
    queued = Stream(limited.v1)
    queued.start()
    wait_until(lambda: limited.metric("scaleinfer_num_requests_waiting") == 1)
    r = http.post(limited.v1 + "/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers.get("retry-after")
    running.stop.set()
    queued.stop.set()
    running.join(30)
    queued.join(30)
    wait_until(lambda: limited.metric("scaleinfer_num_requests_running") == 0
               and limited.metric("scaleinfer_num_requests_waiting") == 0, 10)
    assert http.post(limited.v1 + "/completions", json={"prompt": "x", "max_tokens": 2},
                      headers=AUTH).status_code == 200


def test_sigterm_drains_and_exits_zero(limited, http):
    stream = Stream(limited.v1, max_tokens=400)
    stream.start()
    wait_until(lambda: stream.events >= 2)
    limited.proc.send_signal(signal.SIGTERM)
    assert limited.proc.wait(30) == 0, limited.log()[-2000:]
    stream.join(10)
    assert stream.lines and stream.lines[-1] == "data: [DONE]"  # the stream was ended properly
    assert "shutting_down" in stream.lines[-2]
    with pytest.raises(httpx.TransportError):
        http.get(limited.url + "/health", timeout=2)
    assert "What is" not in limited.log() and "Tell a very long story" not in limited.log()  # no prompts logged
