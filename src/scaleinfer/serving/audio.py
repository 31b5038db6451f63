"""OpenAI's audio routes on a Whisper model: POST /v1/audio/transcriptions and /v1/audio/translations.

    multipart/form-data: file, model, [language], [prompt], [response_format], [temperature],
                         [timestamp_granularities[]], [stream]   (translations: no language, no stream)
    -> speech/ (decode, features, windows over the engine) -> json | text | srt | vtt | verbose_json
       stream=true: SSE `transcript.text.delta` events (one per segment as it is final), then
       `transcript.text.done` with the whole text

Audio that is not audio, empty, too long or at an unusable sample rate is answered 400 with the reason.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from scaleinfer.errors import ConfigError, ScaleInferError
from scaleinfer.serving.generation import AdmittedStream, APIError, ServerState, error_body, sse

logger = logging.getLogger(__name__)

_TEXT_TYPES = {"text": "text/plain; charset=utf-8", "srt": "application/x-subrip; charset=utf-8",
               "vtt": "text/vtt; charset=utf-8"}


def add_audio_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(file: UploadFile = File(...), model: str | None = Form(None),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             response_format: str = Form("json"), temperature: float = Form(0.0),
                             timestamp_granularities: list[str] | None = Form(None, alias="timestamp_granularities[]"),
                             stream: bool = Form(False)):
        return await _handle(state, "transcribe", file, model, language, prompt, response_format, temperature,
                             timestamp_granularities, stream)

    @app.post("/v1/audio/translations")
    async def translations(file: UploadFile = File(...), model: str | None = Form(None),
                           prompt: str | None = Form(None), response_format: str = Form("json"),
                           temperature: float = Form(0.0)):
        return await _handle(state, "translate", file, model, None, prompt, response_format, temperature, None, False)


async def _handle(state: ServerState, task: str, file: UploadFile, model, language, prompt, response_format: str,
                  temperature: float, granularities, stream: bool):
    from scaleinfer.speech.drivers import prepare, whisper_tokens
    from scaleinfer.speech.formats import RESPONSE_FORMATS, language_code
    from scaleinfer.speech.transcribe import TranscriptionOptions

    state.check_model(model)
    eng = state.engine.engine
    try:
        whisper_tokens(state.tokenizer, eng.model_config)
    except ConfigError as exc:
        raise APIError(400, str(exc), param="model") from None
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}",
                       param="response_format")
    if granularities and set(granularities) - {"segment"}:
        raise APIError(400, "timestamp_granularities: only 'segment' is supported (no word timestamps)",
                       param="timestamp_granularities")
    if stream and response_format not in ("json", "text"):
        raise APIError(400, f"stream=true sends text deltas; use response_format json or text, not {response_format}",
                       param="stream")
    temps = TranscriptionOptions.temperatures if temperature == 0 else (temperature,)
    opts = TranscriptionOptions(language=language_code(language), task=task, initial_prompt=prompt or None,
                                temperatures=temps)
    data = await file.read()
    segments: list = []
    gen = await asyncio.to_thread(prepare, data, opts, state.tokenizer, eng.model_config, eng.max_model_len,
                                  None, segments=segments)
    admission = state.admit(1, 1)
    if stream:
        return AdmittedStream(_events(state, gen, segments, admission), admission)
    try:
        result = await _collect(state, gen, segments)
    finally:
        admission.release_all()
    return _response(result, response_format, task)


async def _collect(state: ServerState, gen, segments):
    from scaleinfer.speech.drivers import run_async

    result = None
    async with contextlib.aclosing(run_async(state.engine, gen, segments)) as items:
        async for result in items:
            pass
    return result


def _response(result, response_format: str, task: str):
    from scaleinfer.speech.formats import render

    body = render(result, response_format, task)
    if isinstance(body, dict):
        return JSONResponse(body)
    return PlainTextResponse(body, media_type=_TEXT_TYPES[response_format])


async def _events(state: ServerState, gen, segments, admission):
    from scaleinfer.speech.drivers import run_async
    from scaleinfer.speech.transcribe import Segment

    first = True
    try:
        async with contextlib.aclosing(run_async(state.engine, gen, segments)) as items:
            async for item in items:
                admission.release_all()
                if isinstance(item, Segment):
                    delta = item.text.lstrip() if first else item.text
                    first = False
                    yield sse({"type": "transcript.text.delta", "delta": delta})
                else:
                    yield sse({"type": "transcript.text.done", "text": item.text.strip()})
    except ScaleInferError as exc:   # the status line is sent: report in-band
        yield sse(error_body(str(exc), code="400"))
    except Exception as exc:  # noqa: BLE001
        logger.exception("internal error while streaming a transcription")
        yield sse(error_body(f"internal server error: {type(exc).__name__}", "internal_error", code="500"))
