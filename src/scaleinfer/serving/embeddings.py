"""The encoder server: OpenAI POST /v1/embeddings (float or base64, `dimensions`), vLLM's /v1/classify and
/v1/score, plus /v1/models and /health, over an EncoderEngine.

Requests are tokenized and checked on their own (bad input -> 400 before any work), then their inputs
join one queue: a single worker thread runs everything queued together (cross-request batching under
the engine's token budget) and hands each request its rows back.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import torch
from fastapi import FastAPI
from pydantic import Field

from scaleinfer.serving.generation import APIError, ServerConfig
from scaleinfer.serving.metrics import CONTENT_TYPE, ServerMetrics
from scaleinfer.serving.protocol import _Request

if TYPE_CHECKING:
    from scaleinfer.engine.encoder_engine import EncoderEngine
    from scaleinfer.runner.encoder_runner import EncoderInput

logger = logging.getLogger(__name__)

MAX_INPUTS = 2048
"""Most inputs in one request (OpenAI's own limit for /v1/embeddings)."""

TokenIds = list[int]


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class ClassifyRequest(_Request):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class ScoreRequest(_Request):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


def _inputs(value, field: str = "input") -> list:
    """A request's input as a list of prompts (texts or token-id lists), checked for emptiness and count."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        value = [value]
    if not value:
        raise APIError(400, f"'{field}' is an empty list; send at least one text or token-id list", param=field)
    if len(value) > MAX_INPUTS:
        raise APIError(400, f"'{field}' holds {len(value)} items, more than {MAX_INPUTS}; split the request",
                       param=field)
    for i, item in enumerate(value):
        if (isinstance(item, str) and not item.strip()) or (isinstance(item, list) and not item):
            raise APIError(400, f"'{field}[{i}]' is empty; send text or tokens", param=field)
    return value


class EncoderState:
    """What the routes share: engine, config, metrics, the batching queue and its single worker thread."""

    def __init__(self, engine: EncoderEngine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.metrics = ServerMetrics(config.served_model_name)
        self.created = int(time.time())
        self.draining = False
        self._queue: list[tuple[list, str, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self._tok_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")
        self._worker: asyncio.Task | None = None

    def check_model(self, model: str | None) -> None:
        self.config.check_model(model)

    async def call(self, fn, *args):
        """Tokenize / validate on a worker thread (never on the event loop)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn, *args)

    async def run(self, inputs: list[EncoderInput], task: str) -> list[torch.Tensor]:
        """The engine's rows for `inputs`, batched with whatever else is queued."""
        if self._worker is None:
            self._wake = asyncio.Event()
            self._worker = asyncio.ensure_future(self._loop())
        future = asyncio.get_running_loop().create_future()
        self._queue.append((inputs, task, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            jobs, self._queue = self._queue, []
            for task in {t for _, t, _ in jobs}:
                group = [(x, f) for x, t, f in jobs if t == task and not f.cancelled()]
                merged = [x for xs, _ in group for x in xs]
                try:
                    rows = await loop.run_in_executor(self._pool, self.engine.run, merged, task)
                except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                    for _, f in group:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                start = 0
                for xs, f in group:
                    if not f.done():
                        f.set_result(rows[start:start + len(xs)])
                    start += len(xs)

    async def drain(self, timeout_s: float, force=lambda: False) -> None:
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline and not force():
            await asyncio.sleep(0.05)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._tok_pool.shutdown(wait=False, cancel_futures=True)


def _usage(inputs) -> dict:
    n = sum(len(x.token_ids) for x in inputs)
    return {"prompt_tokens": n, "total_tokens": n}


def _encode_vector(row: torch.Tensor, fmt: str):
    if fmt == "base64":   # little-endian float32 bytes, as OpenAI
        return base64.b64encode(row.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()
    return row.tolist()


def _classification(eng: EncoderEngine, index: int, logits: torch.Tensor) -> dict:
    probs = eng.probabilities(logits)
    return {"index": index, "label": eng.label(int(probs.argmax())), "probs": probs.tolist(),
            "num_classes": len(probs)}


def build_encoder_app(engine: EncoderEngine, config: ServerConfig) -> FastAPI:
    from scaleinfer.serving.app import _add_error_handlers, _openapi
    from scaleinfer.serving.guard import Gate

    state = EncoderState(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("serving encoder %s (%s) on %s://%s:%d%s", config.served_model_name, engine.config.task,
                    config.scheme, config.host, config.port, "" if config.api_key is None else " (API key required)")
        try:
            yield
        finally:
            state.close()

    docs = config.enable_docs
    app = FastAPI(title="scaleinfer", summary="OpenAI-compatible embedding server", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.openapi = lambda: _openapi(app)
    app.state.server = state
    app.add_middleware(Gate, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: EncoderState) -> None:
    from fastapi.responses import Response

    eng = state.engine

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def card() -> dict:
        return {"id": state.config.served_model_name, "object": "model", "created": state.created,
                "owned_by": "scaleinfer", "max_model_len": eng.max_seq_length, "task": eng.config.task}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        state.check_model(model)
        return card()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        state.check_model(body.model)
        prompts = _inputs(body.input)
        eng.check_dimensions(body.dimensions)
        inputs = await state.call(eng.tokenize, prompts, body.truncate_prompt_tokens)
        rows = await state.run(inputs, "embed")
        if body.dimensions is not None and body.dimensions != eng.embedding_size:
            rows = [torch.nn.functional.normalize(r[:body.dimensions], dim=-1) for r in rows]
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(r, body.encoding_format)}
                for i, r in enumerate(rows)]
        return {"object": "list", "data": data, "model": state.config.served_model_name, "usage": _usage(inputs)}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        state.check_model(body.model)
        eng.require_task("classify", "/v1/classify")
        prompts = _inputs(body.input)
        inputs = await state.call(eng.tokenize, prompts, body.truncate_prompt_tokens)
        data = [_classification(eng, i, logits) for i, logits in enumerate(await state.run(inputs, "classify"))]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": state.config.served_model_name, "data": data, "usage": _usage(inputs)}

    @app.post("/v1/score")
    async def score(body: ScoreRequest):
        state.check_model(body.model)
        queries, docs = _inputs(body.text_1, "text_1"), _inputs(body.text_2, "text_2")
        inputs, task = await state.call(eng.score_inputs, queries, docs, body.truncate_prompt_tokens)
        scores, _ = eng.scores(inputs, await state.run(inputs, task))
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        n = sum(len(x.token_ids) for x in inputs)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": state.config.served_model_name, "data": data,
                "usage": {"prompt_tokens": n, "total_tokens": n}}
