"""The HTTP routes of `scaleinfer serve`: OpenAI completions and chat (JSON and SSE), models, tokenize,
health and Prometheus metrics; every error becomes OpenAI error JSON with the right status.

    POST /v1/chat/completions -> protocol (validate) -> openai (SamplingParams) -> generation (engine)
                              -> openai (JSON / chunks) -> JSON or SSE "data: ...", "data: [DONE]"
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from scaleinfer.errors import EngineDeadError, RequestError, ScaleInferError
from scaleinfer.serving import openai as oai
from scaleinfer.serving.audio import add_audio_routes
from scaleinfer.serving.generation import (Admission, AdmittedStream, APIError, ClientGone, ServerConfig, ServerState, error_body,
                                           sse, throughput_log, unless_disconnected)
from scaleinfer.serving.guard import Gate
from scaleinfer.serving.metrics import CONTENT_TYPE, snapshot
from scaleinfer.serving.protocol import (ERROR_RESPONSES, GENERATION_RESPONSES, ChatCompletionRequest, CompletionRequest,
                                         DetokenizeRequest, TokenizeRequest)
from scaleinfer.serving.structured import structured_params
from scaleinfer.serving.tools import ToolPlan, ToolStream, prepare_chat, tool_plan, tool_stream_choices

if TYPE_CHECKING:
    from scaleinfer.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    state = ServerState(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine.engine
        logger.info("serving %s: dtype %s, KV cache %d tokens, threads %d, max %d running; %s://%s:%d%s",
                    config.served_model_name, eng.config.dtype, eng.kv_capacity_tokens, torch.get_num_threads(),
                    eng.config.scheduler.max_num_seqs, config.scheme, config.host, config.port,
                    "" if config.api_key is None else " (API key required)")
        ticker = asyncio.ensure_future(throughput_log(state, config.log_interval_s))
        try:
            yield
        finally:
            ticker.cancel()
            engine.shutdown()
            state.close()
            logger.info("engine stopped")

    docs = config.enable_docs
    app = FastAPI(title="scaleinfer", summary="OpenAI-compatible LLM server", lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None, responses=ERROR_RESPONSES)
    app.openapi = lambda: _openapi(app)
    app.state.server = state
    app.add_middleware(Gate, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    add_audio_routes(app, state)   # /v1/audio/transcriptions, /v1/audio/translations (Whisper models)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 validation responses: this server answers those 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for operations in schema["paths"].values():
            for op in operations.values():
                op["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, code, param), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in ctype.lower():
            return _error(400, f"the body must be JSON sent with 'Content-Type: application/json' (got "
                               f"{ctype or 'no Content-Type'!r})")
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return _error(400, f"invalid request: {loc or 'body'}: {first.get('msg', 'invalid')}{more}",
                      param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = _error(exc.status_code, str(exc.detail), code=None if exc.status_code != 404 else "not_found")
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        response = _error(exc.status, exc.message, exc.type, exc.code, exc.param)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError):
        return _error(503, str(exc), type="service_unavailable")

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody is listening; 499 shows up in /metrics

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}", type="internal_error")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.engine.is_dead:
            raise EngineDeadError("the engine loop died; restart the server")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        if not state.engine.is_dead:
            state.metrics.update_engine(await state.engine.call(snapshot))
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": state.config.served_model_name, "object": "model", "created": state.created,
                "owned_by": "scaleinfer", "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        state.check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("send exactly one of prompt or messages")
        if body.messages is not None:
            ids = await state.encode_chat(oai.chat_messages(body.messages), body.add_generation_prompt, check=False)
        else:
            ids = await state.tokenize(body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < state.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {state.vocab_size})")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.post("/v1/embeddings")
    @app.post("/v1/classify")
    @app.post("/v1/score")
    async def pooling_on_generate_model(request: Request):
        raise RequestError(f"{request.url.path} needs an encoder model (e.g. `scaleinfer serve all-minilm-l6-v2`); "
                           f"{state.config.served_model_name!r} is a generate model: use /v1/completions or "
                           f"/v1/chat/completions")

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        state.check_model(body.model)
        oai.refuse_unsupported(body)
        raw = oai.completion_prompts(body)
        for p in raw:
            if isinstance(p, str):
                state.check_chars(len(p), "prompt")
        structured = structured_params(body)
        admission = state.admit(len(raw), body.n)
        try:
            prompts = [state.check_prompt(p) if isinstance(p, list) else await state.encode_text(p) for p in raw]
            head = oai.Header(_new_id("cmpl"), int(time.time()), state.config.served_model_name)
            jobs = [(ids, state.params(body, ids, structured), f"{head.id}-{i}") for i, ids in enumerate(prompts)]
            await state.check_structured(jobs[0][1])
        except BaseException:
            admission.release_all()
            raise
        num_top = body.logprobs or 0
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_stream_completion(state, head, jobs, body.n, num_top, usage, admission), admission)
        try:
            outputs = await unless_disconnected(request, state.collect(jobs, admission))
        finally:
            admission.release_all()
        return oai.completion_body(head, outputs, num_top, state.token_text)

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        oai.refuse_unsupported(body)
        plan, structured = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls), structured_params(body)
        if plan is not None and plan.structured is not None:
            if structured is not None:
                raise RequestError(f"tool_choice={body.tool_choice!r} already constrains the output to a tool call; "
                                   f"drop response_format / guided_* / structured_outputs")
            structured = plan.structured
        messages, template_kwargs = prepare_chat(oai.chat_messages(body.messages), plan, state.tokenizer.chat_template)
        state.check_chars(sum(len(m["content"]) for m in messages), "conversation")
        admission = state.admit(1, body.n)
        try:
            ids = await state.encode_chat(messages, body.add_generation_prompt, template_kwargs=template_kwargs)
            head = oai.Header(_new_id("chatcmpl"), int(time.time()), state.config.served_model_name)
            job = (ids, state.params(body, ids, structured), head.id)
            await state.check_structured(job[1])
        except BaseException:
            admission.release_all()
            raise
        num_top = body.top_logprobs or 0
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_stream_chat(state, head, job, body.n, num_top, usage, admission, plan), admission)
        try:
            (output,) = await unless_disconnected(request, state.collect([job], admission))
        finally:
            admission.release_all()
        return oai.chat_body(head, output, num_top, state.token_text, plan)


def _sse(chunks, admission: Admission) -> StreamingResponse:
    return AdmittedStream(chunks, admission)


async def _stream_completion(state: ServerState, head: oai.Header, jobs, n: int, num_top: int, usage: bool,
                             admission: Admission):
    cursor = oai.StreamCursor()
    finals = [None] * len(jobs)
    try:
        async with contextlib.aclosing(state.stream(jobs, admission)) as outs:
            async for p, out in outs:
                finals[p] = out
                for delta in cursor.deltas(out, p * n):
                    choice = oai.completion_chunk_choice(delta, out, cursor, num_top, state.token_text)
                    yield sse(oai.completion_chunk(head, [choice], usage))
        if usage:
            yield sse(oai.usage_chunk(head, "text_completion", finals))
    except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
        yield sse(_stream_error(exc))
    yield sse("[DONE]")


async def _stream_chat(state: ServerState, head: oai.Header, job, n: int, num_top: int, usage: bool,
                       admission: Admission, plan: ToolPlan | None = None):
    cursor = oai.StreamCursor()
    final = None
    tool_streams = {i: ToolStream(plan) for i in range(n)} if plan is not None else None
    try:
        for i in range(n):
            yield sse(oai.chat_chunk(head, [oai.chat_role_choice(i)], usage))
        async with contextlib.aclosing(state.stream([job], admission)) as outs:
            async for _, final in outs:
                for delta in cursor.deltas(final):
                    if tool_streams is not None:
                        for choice in tool_stream_choices(tool_streams[delta.index], delta, final):
                            yield sse(oai.chat_chunk(head, [choice], usage))
                        continue
                    choice = oai.chat_chunk_choice(delta, final, num_top, state.token_text)
                    yield sse(oai.chat_chunk(head, [choice], usage))
        if usage:
            yield sse(oai.usage_chunk(head, "chat.completion.chunk", [final]))
    except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
        yield sse(_stream_error(exc))
    yield sse("[DONE]")


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, APIError):
        return error_body(exc.message, exc.type, exc.code)
    if isinstance(exc, ScaleInferError):
        status = 503 if isinstance(exc, EngineDeadError) else 400
        return error_body(str(exc), "invalid_request_error" if status == 400 else "service_unavailable",
                          code=str(status))
    logger.exception("internal error while streaming")
    return error_body(f"internal server error: {type(exc).__name__}", "internal_error", code="500")
