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
    engine.add_request(request_id, job.prompt_ids, job.params, encoder_input=job.encoder_input)
    return request_id


def run_offline(engine, generators: list[Generator]) -> list[Transcription]:
    """Run the transcriptions to completion on an LLMEngine, their windows batched together."""
    results: list[Transcription | None] = [None] * len(generators)
    active: dict[str, tuple[int, Generator]] = {}
    try:
        for i, gen in enumerate(generators):
            active[_submit(engine, next(gen))] = (i, gen)
        while active:
            for out in engine.step():
                if not out.finished or out.request_id not in active:
                    continue
                i, gen = active.pop(out.request_id)
                try:
                    job = gen.send(out)
                except StopIteration as stop:
                    results[i] = stop.value
                    continue
                active[_submit(engine, job)] = (i, gen)
    except BaseException:
        for request_id in active:
            engine.abort_request(request_id)
        raise
    return results   # type: ignore[return-value]


async def run_async(async_engine, gen: Generator, segments: list[Segment]):
    """Run one transcription on the AsyncEngine (each window decode is one engine request), yielding each
    final segment as soon as it is known (`segments` is the list `gen` was made to fill), then the
    Transcription."""
    job = next(gen)
    sent = 0
    while True:
        last = None
        async for out in async_engine.generate(job.prompt_ids, job.params, encoder_input=job.encoder_input):
            last = out
        try:
            job = gen.send(last)
        except StopIteration as stop:
            result = stop.value
            break
        finally:
            while sent < len(segments):
                sent += 1
                yield segments[sent - 1]
    yield result
