"""Runs the routes' requests on the AsyncEngine: prompt checks, tokenization on worker threads (never on
the event loop), admission (--max-waiting, counted in sequences), per-request metrics, merging several
prompts' streams, SSE framing, and aborting when the client goes away.

app.py owns the routes; openai.py turns what this module yields into JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import StreamingResponse

from scaleinfer.errors import RequestError
from scaleinfer.request import RequestOutput
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams
from scaleinfer.serving.limits import ServerLimits
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
    """Most admitted sequences (prompts x n) without a first token (queued or in prefill); beyond it, 429."""
    host: str = "127.0.0.1"
    port: int = 8000
    scheme: str = "http"
    """https when the server speaks TLS."""
    log_interval_s: float = 10.0
    limits: ServerLimits = ServerLimits()
    enable_docs: bool = True
    """Serve /docs, /redoc and /openapi.json (--disable-docs turns them off)."""

    def check_model(self, model: str | None) -> None:
        """404 unless `model` (None: not given) names what this server runs."""
        if model is None or model == self.served_model_name or model in self.model_aliases:
            return
        raise APIError(404, f"the model {model!r} does not exist; this server runs "
                            f"{self.served_model_name!r} (see GET /v1/models)", code="model_not_found",
                       param="model")


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


TOKENIZER_THREADS = 4
"""Worker threads that tokenize and render chat templates (the tokenizer releases the GIL)."""


class Admission:
    """The sequences one request holds in ServerState.num_pending until each job's first token."""

    def __init__(self, state: ServerState, num_seqs: int):
        self._state, self.held = state, num_seqs
        state.num_pending += num_seqs

    def release(self, num_seqs: int) -> None:
        num_seqs = min(num_seqs, self.held)
        self.held -= num_seqs
        self._state.num_pending -= num_seqs

    def release_all(self) -> None:
        self.release(self.held)


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
        """Admitted sequences without a first token yet (see Admission)."""
        self.max_prompt_chars = self.max_model_len * self.tokenizer.max_token_chars
        """A longer text has more tokens than the context holds: refused before it is tokenized."""
        self._pool: ThreadPoolExecutor | None = None
        self.draining = False
        self._tasks: set[asyncio.Future] = set()
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}

    # ---- checks before anything reaches the engine ---------------------------------------------
    def check_model(self, model: str | None) -> None:
        self.config.check_model(model)

    def admit(self, num_prompts: int, n: int) -> Admission:
        """Count a request's prompts x n sequences as waiting, or refuse it: 400 if it can never be
        admitted, 429 if it does not fit now. No await in here: the check and the count are atomic."""
        if self.draining:
            raise ShuttingDown()
        num_seqs = num_prompts * n
        cap = self.config.limits.max_seqs_per_request
        if num_seqs > cap:
            raise APIError(400, f"this request asks for {num_seqs} sequences ({num_prompts} prompts x n={n}), more "
                                f"than the {cap} one request may (--max-seqs-per-request); split it", param="n")
        limit = self.config.max_waiting
        if limit is not None and num_seqs > limit:
            raise APIError(400, f"this request asks for {num_seqs} sequences ({num_prompts} prompts x n={n}), more "
                                f"than this server lets wait at once (--max-waiting {limit}); split it", param="n")
        if limit is not None and self.num_pending + num_seqs > limit:
            raise APIError(429, f"the server is busy: {self.num_pending} sequences are waiting for their first "
                                f"token (--max-waiting {limit}); retry later", type="rate_limit_exceeded",
                           code="rate_limit_exceeded")
        return Admission(self, num_seqs)

    def check_chars(self, num_chars: int, what: str) -> None:
        """Refuse a text that cannot fit the context whatever its tokens, before tokenizing it."""
        if num_chars > self.max_prompt_chars:
            raise RequestError(f"the {what} has {num_chars} characters: more tokens than the context of "
                               f"{self.max_model_len} holds (a token here spans at most "
                               f"{self.tokenizer.max_token_chars} characters); shorten it")

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

    def params(self, body, prompt_ids: list[int], structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """The SamplingParams of a completion or chat body for this prompt (`structured`: its output constraint)."""
        return sampling_params(body, len(prompt_ids), self.max_model_len, self.vocab_size, structured)

    async def check_structured(self, params: SamplingParams) -> None:
        """Compile the request's grammar on a worker thread (cached for the engine): a bad schema, regex or
        grammar is a 400 before any response starts, and the engine thread never compiles it."""
        if params.structured_outputs is not None:
            await self.off_loop(self.engine.engine.compile_structured, params)

    async def off_loop(self, fn: Callable, *args):
        """fn(*args) on a tokenizer thread, so a long text never stalls the other connections."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return await self.off_loop(self.tokenizer.encode, text, add_special_tokens)
        except UnicodeEncodeError as exc:  # the protocol refuses lone surrogates first; this is the backstop
            raise RequestError(f"the text is not valid Unicode ({exc.reason}); send UTF-8 text") from None

    async def encode_text(self, text: str) -> list[int]:
        self.check_chars(len(text), "prompt")
        return self.check_prompt(await self.tokenize(text))

    async def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                          check: bool = True, template_kwargs: dict | None = None) -> list[int]:
        """`template_kwargs`: extra chat-template arguments (tools)."""
        if check:
            self.check_chars(sum(len(m["content"]) for m in messages), "conversation")
        try:
            text = await self.off_loop(self._render, messages, add_generation_prompt, template_kwargs or {})
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is a bad request
            raise RequestError(f"the model's chat template cannot render these messages: {exc}") from exc
        ids = await self.tokenize(text, False)
        return self.check_prompt(ids, "conversation") if check else ids

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, kwargs: dict) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def close(self) -> None:
        """Stop the tokenizer threads (a later request starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def token_text(self, token_id: int) -> str:
        """A token's own text, for logprobs (cached: the same few thousand tokens come back)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # ---- running requests ----------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       admission: Admission) -> AsyncIterator[RequestOutput]:
        """engine.generate with metrics; its n sequences leave `admission` at the first token (or the end)."""
        start = time.perf_counter()
        first = None
        last = None
        try:
            async with contextlib.aclosing(self.engine.generate(prompt_ids, params, request_id)) as outs:
                async for out in outs:
                    if first is None and any(c.token_ids for c in out.outputs):
                        first = time.perf_counter()
                        admission.release(params.n)
                    last = out
                    yield out
        finally:
            if first is None:
                admission.release(params.n)
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

    async def collect(self, jobs: list[tuple[list[int], SamplingParams, str]], admission: Admission
                      ) -> list[RequestOutput]:
        """The final outputs of several requests, in job order."""
        finals: list = [None] * len(jobs)
        async with contextlib.aclosing(self.stream(jobs, admission)) as outs:
            async for i, out in outs:
                finals[i] = out
        return finals

    async def stream(self, jobs: list[tuple[list[int], SamplingParams, str]], admission: Admission
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(job index, cumulative output) of several requests as they come; leaving early aborts all.

        Each request runs in its own task (registered for drain()), feeding one queue.
        """
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, job) -> None:
            try:
                async with contextlib.aclosing(self.generate(*job, admission)) as outs:
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


class AdmittedStream(StreamingResponse):
    """An SSE response that gives its request's admission back however it ends, even unstarted."""

    def __init__(self, chunks, admission: Admission):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release_all()
