"""Running transcriptions (speech/transcribe.py: generators of window decodes) on an engine: many at once
on an LLMEngine (their windows batch together in its steps), or one on the AsyncEngine (the server)."""
from __future__ import annotations

import logging
from collections.abc import Generator

import numpy as np

from scaleinfer.errors import ConfigError
from scaleinfer.speech.audio import DEFAULT_MAX_SECONDS, load_audio
from scaleinfer.speech.decoding import WhisperTokens
from scaleinfer.speech.features import log_mel_spectrogram
from scaleinfer.speech.transcribe import Segment, Transcription, TranscriptionOptions, transcription_steps

logger = logging.getLogger(__name__)

AudioInput = str | bytes | np.ndarray


def whisper_tokens(tokenizer, model_config) -> WhisperTokens:
    """The special tokens of a loaded Whisper model (ConfigError for any other model)."""
    if model_config.architecture != "whisper":
        raise ConfigError(f"transcription needs a Whisper model, and {model_config.name or model_config.architecture} "
                          f"is a {model_config.architecture} model; load e.g. --model whisper-base")
    wc = model_config.arch_config
    return WhisperTokens.from_tokenizer(tokenizer, wc.lang_ids, wc.suppress_ids, wc.suppress_ids_begin)


def prepare(audio: AudioInput, opts: TranscriptionOptions, tokenizer, model_config, max_length: int,
            sample_rate: int | None = None, max_seconds: float | None = DEFAULT_MAX_SECONDS,
            segments: list[Segment] | None = None) -> Generator:
    """Decode the audio, compute its features, and return the transcription's generator."""
    tokens = whisper_tokens(tokenizer, model_config)
    if opts.language is not None:
        tokens.language_id(opts.language)   # an unknown language fails before any work
    samples = load_audio(audio, sample_rate, max_seconds)
    features = log_mel_spectrogram(samples, model_config.arch_config.num_mel_bins)
    return transcription_steps(features, tokens, tokenizer, opts, max_length, segments)


def _submit(engine, job) -> str:
    request_id = f"whisper-{engine.new_request_id()}"
    engine.add_request(request_id, job.prompt_ids, job.params, encoder_input=job.encoder_input,
                       keep_encoder_output=job.may_retry)
    return request_id


def _moved_on(job, next_job) -> bool:
    """Whether the engine may drop what it kept of `job`'s window: the next decode reads another window."""
    return job.may_retry and (next_job is None or next_job.encoder_input is not job.encoder_input)


def run_offline(engine, generators: list[Generator]) -> list[Transcription]:
    """Run the transcriptions to completion on an LLMEngine, their windows batched together. A window
    decoded again at a higher temperature reuses its encoder output (DecodeJob.may_retry)."""
    results: list[Transcription | None] = [None] * len(generators)
    active: dict[str, tuple[int, Generator, object]] = {}
    try:
        for i, gen in enumerate(generators):
            job = next(gen)
            active[_submit(engine, job)] = (i, gen, job)
        while active:
            for out in engine.step():
                if not out.finished or out.request_id not in active:
                    continue
                i, gen, job = active.pop(out.request_id)
                try:
                    next_job = gen.send(out)
                except StopIteration as stop:
                    next_job, results[i] = None, stop.value
                if _moved_on(job, next_job):
                    engine.release_encoder_output(job.encoder_input)
                if next_job is not None:
                    active[_submit(engine, next_job)] = (i, gen, next_job)
    except BaseException:
        for request_id, (_, _, job) in active.items():
            engine.abort_request(request_id)
            engine.release_encoder_output(job.encoder_input)
        raise
    return results   # type: ignore[return-value]


async def run_async(async_engine, gen: Generator, segments: list[Segment]):
    """Run one transcription on the AsyncEngine (each window decode is one engine request), yielding each
    final segment as soon as it is known (`segments` is the list `gen` was made to fill), then the
    Transcription."""
    job = next(gen)
    sent = 0
    try:
        while True:
            last = None
            async for out in async_engine.generate(job.prompt_ids, job.params, encoder_input=job.encoder_input,
                                                   keep_encoder_output=job.may_retry):
                last = out
            try:
                next_job = gen.send(last)
            except StopIteration as stop:
                next_job, result = None, stop.value
            finally:
                while sent < len(segments):
                    sent += 1
                    yield segments[sent - 1]
            if _moved_on(job, next_job):
                await async_engine.call(lambda e, x=job.encoder_input: e.release_encoder_output(x))
            if next_job is None:
                break
            job = next_job
    except BaseException:
        if job.may_retry:   # a client gone mid-window: nothing will decode it again
            async_engine.call_soon(lambda e, x=job.encoder_input: e.release_encoder_output(x))
        raise
    yield result
