"""Runs the routes' requests on the AsyncEngine: prompt checks, admission (--max-waiting), per-request
metrics, merging several prompts' streams, SSE framing, and aborting when the client goes away.

app.py owns the routes; openai.py turns what this module yields into JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

from scaleinfer.errors import RequestError
from scaleinfer.request import RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.serving.metrics import ServerMetrics
from scaleinfer.serving.openai import sampling_params

if TYPE_CHECKING:
    from scaleinfer.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type; app.py renders it as OpenAI error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


class ShuttingDown(APIError):
    """The server stopped (SIGTERM / SIGINT) before the request finished, or before it started."""

    def __init__(self):
        super().__init__(503, "the server is shutting down; the request was not completed, retry elsewhere",
                         type="service_unavailable", code="shutting_down")


class ClientGone(Exception):
    """The client disconnected before its non-streaming response was ready."""


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    model_aliases: frozenset[str] = frozenset()
    """Other names accepted in the `model` field (catalog name, checkpoint name)."""
    api_key: str | None = None
    max_waiting: int | None = None
    """Most admitted requests without a first token (queued or in prefill); beyond it, 429."""
    host: str = "127.0.0.1"
    port: int = 8000
    log_interval_s: float = 10.0


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class ServerState:
    """Everything the routes share: the engine, the config, the metrics and the admission count."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.engine.max_model_len
        self.vocab_size: int = engine.engine.model_config.vocab_size
        self.kv_capacity_tokens: int = engine.engine.kv_capacity_tokens
        self.metrics = ServerMetrics(config.served_model_name)
        self.num_pending = 0
        self.draining = False
        self._tasks: set[asyncio.Future] = set()
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    # ---- checks before anything reaches the engine ---------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is None or model == self.config.served_model_name or model in self.config.model_aliases:
            return
        raise APIError(404, f"the model {model!r} does not exist; this server runs "
                            f"{self.config.served_model_name!r} (see GET /v1/models)", code="model_not_found",
                       param="model")

    def check_admission(self) -> None:
        if self.draining:
            raise ShuttingDown()
        limit = self.config.max_waiting
        if limit is not None and self.num_pending >= limit:
            raise APIError(429, f"the server is busy: {self.num_pending} requests are waiting (--max-waiting "
                                f"{limit}); retry later", type="rate_limit_exceeded", code="rate_limit_exceeded")

    def check_prompt(self, prompt_ids: list[int], what: str = "prompt") -> list[int]:
        n = len(prompt_ids)
        if n == 0:
            raise RequestError(f"the {what} is empty; send at least one token")
        if n >= self.max_model_len:
            raise RequestError(f"the {what} has {n} tokens but the context is {self.max_model_len} tokens "
                               f"(room is needed for at least one output token); shorten it")
        if n + 1 > self.kv_capacity_tokens:
            raise RequestError(f"the {what} has {n} tokens but the KV cache holds only {self.kv_capacity_tokens}")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} in the {what} is outside the vocabulary [0, {self.vocab_size})")
        return prompt_ids

    def params(self, body, prompt_ids: list[int]) -> SamplingParams:
        """The SamplingParams of a completion or chat body for this prompt."""
        return sampling_params(body, len(prompt_ids), self.max_model_len, self.vocab_size)

    def encode_text(self, text: str) -> list[int]:
        return self.check_prompt(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    check: bool = True) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is a bad request
            raise RequestError(f"the model's chat template cannot render these messages: {exc}") from exc
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.check_prompt(ids, "conversation") if check else ids

    def token_text(self, token_id: int) -> str:
        """A token's own text, for logprobs (cached: the same few thousand tokens come back)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # ---- running requests ----------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """engine.generate with admission bookkeeping and metrics."""
        start = time.perf_counter()
        first = None
        last = None
        self.num_pending += 1
        try:
            async with contextlib.aclosing(self.engine.generate(prompt_ids, params, request_id)) as outs:
                async for out in outs:
                    if first is None and any(c.token_ids for c in out.outputs):
                        first = time.perf_counter()
                        self.num_pending -= 1
                    last = out
                    yield out
        finally:
            if first is None:
                self.num_pending -= 1
            self._record(last, params, start, first)

    def _record(self, last: RequestOutput | None, params: SamplingParams, start: float, first: float | None):
        end = time.perf_counter()
        if last is None:
            return
        num_out = sum(len(c.token_ids) for c in last.outputs)
        per_choice = num_out / max(1, len(last.outputs))
        tpot = (end - first) / (per_choice - 1) if first is not None and per_choice > 1 else None
        reasons = [c.finish_reason if last.finished else "abort" for c in last.outputs]
        self.metrics.record_finished(reasons, len(last.prompt_token_ids), num_out,
                                     None if first is None else first - start, tpot, end - start)

    async def collect(self, jobs: list[tuple[list[int], SamplingParams, str]]) -> list[RequestOutput]:
        """The final outputs of several requests, in job order."""
        finals: list = [None] * len(jobs)
        async with contextlib.aclosing(self.stream(jobs)) as outs:
            async for i, out in outs:
                finals[i] = out
        return finals

    async def stream(self, jobs: list[tuple[list[int], SamplingParams, str]]
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(job index, cumulative output) of several requests as they come; leaving early aborts all.

        Each request runs in its own task (registered for drain()), feeding one queue.
        """
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, job) -> None:
            try:
                async with contextlib.aclosing(self.generate(*job)) as outs:
                    async for out in outs:
                        queue.put_nowait((i, out))
            except asyncio.CancelledError:
                queue.put_nowait((i, ShuttingDown()))  # read only when drain() cancelled us
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, done))

        tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
        self._tasks.update(tasks)
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
                self._tasks.discard(t)

    async def drain(self, timeout_s: float, force: Callable[[], bool] = lambda: False) -> None:
        """Refuse new requests, let running ones finish for up to timeout_s, then abort the rest."""
        self.draining = True
        logger.info("shutting down: no longer accepting requests")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._tasks:
            logger.info("shutting down: waiting up to %.0f s for %d running requests", timeout_s, len(self._tasks))
        while self._tasks and loop.time() < deadline and not force():
            await asyncio.sleep(0.05)
        if self._tasks:
            logger.warning("shutting down: aborting %d requests still running", len(self._tasks))
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0.2)  # let their responses send their last chunk


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


async def throughput_log(state: ServerState, interval_s: float) -> None:
    """Every interval, one INFO line with prompt and generation throughput, queue sizes and KV usage."""
    from scaleinfer.serving.metrics import snapshot

    prev = await state.engine.call(snapshot)
    prev_t = time.perf_counter()
    while True:
        await asyncio.sleep(interval_s)
        snap = await state.engine.call(snapshot)
        now = time.perf_counter()
        dt = now - prev_t
        if snap.num_steps != prev.num_steps or snap.num_running or snap.num_waiting:
            logger.info("throughput: prompt %.1f tok/s, generation %.1f tok/s; running %d, waiting %d; "
                        "KV cache %.1f%% used", (snap.num_prompt_tokens - prev.num_prompt_tokens) / dt,
                        (snap.num_generation_tokens - prev.num_generation_tokens) / dt, snap.num_running,
                        snap.num_waiting, 100 * snap.kv_cache_usage)
        prev, prev_t = snap, now
