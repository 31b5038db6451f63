"""Long-form transcription with Whisper, as openai-whisper / faster-whisper do it, on the engine.

The audio's log-mel features are cut into 30 s windows starting at `seek`. Each window is decoded (one
engine request: the encoder runs on the window, the decoder from the task prompt, the previous text as
context); the result is split into segments at its timestamp pairs and `seek` moves to the last
complete timestamp (or a whole window on), so speech cut at a window's end is decoded again in the
next one. A window whose text is too repetitive (gzip compression ratio > 2.4) or too unlikely (average
log-probability < -1) is decoded again at the next temperature (0.2, 0.4 ... 1.0), unless the model
says it holds no speech. At temperature 0 a window is decoded greedily, or with beam search when
beam_size is set; above 0, best_of samples are drawn (sharing one encoder run) and the likeliest kept.
After a decode above temperature 0.5 the context is reset.

`transcription_steps` is written without any I/O: a generator that yields one DecodeJob at a time and
is sent back the engine's RequestOutput for it. drivers.py runs many of them over one engine (their
windows batch in the engine's steps) or one over the async engine (the server).
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from scaleinfer.errors import RequestError
from scaleinfer.request import RequestOutput
from scaleinfer.sampling_params import SamplingParams
from scaleinfer.speech.decoding import TIME_PRECISION, WhisperTokens, WindowRules
from scaleinfer.speech.features import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, pad_or_trim

logger = logging.getLogger(__name__)
TASKS = ("transcribe", "translate")
FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE
INPUT_STRIDE = 2
"""Mel frames per encoder state (and per timestamp step: 0.02 s)."""


@dataclass
class TranscriptionOptions:
    language: str | None = None
    """ISO code ("en"); None: detected on the first window."""
    task: str = "transcribe"
    """"transcribe", or "translate" (to English)."""
    without_timestamps: bool = False
    """Decode without timestamp tokens (one segment per window; long audio is then cut at 30 s)."""
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    best_of: int = 5
    """Samples drawn at a temperature above 0; the most likely (by average log-probability) is kept."""
    beam_size: int | None = None
    """Beam search with this many beams at temperature 0 (openai-whisper / faster-whisper use 5); None: greedy."""
    patience: float = 1.0
    """Beam search: stop once round(beam_size * patience) sequences finished."""
    length_penalty: float = 1.0
    """Beam search: a finished sequence scores sum(logprobs) / length ** length_penalty (faster-whisper's)."""
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | None = None
    max_initial_timestamp: float = 1.0
    max_new_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise RequestError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not self.temperatures or any(not 0.0 <= t <= 2.0 for t in self.temperatures):
            raise RequestError(f"temperatures must be a non-empty list of values in [0, 2], got {self.temperatures}")
        if not 1 <= self.best_of <= 16:
            raise RequestError(f"best_of must be from 1 to 16, got {self.best_of}")
        if self.beam_size is not None and (isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int)
                                           or not 1 <= self.beam_size <= 16):
            raise RequestError(f"beam_size must be an integer from 1 to 16, got {self.beam_size!r}")
        if not 0.0 < self.patience <= 16.0:
            raise RequestError(f"patience must be in (0, 16], got {self.patience}")
        if not -10.0 <= self.length_penalty <= 10.0:
            raise RequestError(f"length_penalty must be between -10 and 10, got {self.length_penalty}")
        self.temperatures = tuple(self.temperatures)


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    seek: int


@dataclass
class Transcription:
    text: str
    language: str
    language_probability: float | None
    duration: float
    segments: list[Segment] = field(default_factory=list)


@dataclass
class DecodeJob:
    """One window decode to run as an engine request."""

    prompt_ids: list[int]
    encoder_input: torch.Tensor
    params: SamplingParams
    rules: WindowRules
    may_retry: bool = False
    """A fallback may decode this window again (a higher temperature is left and a threshold is set): the
    engine keeps its encoder output until the driver releases it (drivers.py)."""


@dataclass
class _Attempt:
    tokens: list[int]          # sampled tokens, forced ones and <|endoftext|> removed
    avg_logprob: float
    compression_ratio: float
    temperature: float
    no_speech_prob: float


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def transcription_steps(features: torch.Tensor, tokens: WhisperTokens, tokenizer, opts: TranscriptionOptions,
                        max_length: int, segments: list[Segment] | None = None
                        ) -> Generator[DecodeJob, RequestOutput, Transcription]:
    """The whole transcription of `features` ([n_mels, frames] of the entire audio, padded by one hop).
    `segments`: a list the final segments are appended to as soon as they are known (for streaming)."""
    content_frames = features.shape[-1] - 1
    seek, all_tokens, reset_since = 0, [], 0
    if opts.initial_prompt:
        all_tokens += tokenizer.encode(" " + opts.initial_prompt.strip(), add_special_tokens=False)
    language, language_prob = opts.language, None
    segments = [] if segments is None else segments
    while seek < content_frames:
        size = min(N_FRAMES, content_frames - seek)
        window = pad_or_trim(features[:, seek:seek + size])
        previous = all_tokens[reset_since:][-(max_length // 2 - 1):]
        prompt = ([tokens.sot_prev, *previous] if previous else []) + [tokens.sot]
        attempt, language, detected_prob = yield from _decode_with_fallback(
            window, prompt, tokens, tokenizer, opts, language, max_length)
        language_prob = detected_prob if language_prob is None else language_prob
        if _is_silence(attempt, opts):
            seek += size
            continue
        pieces, next_seek = _split_by_timestamps(attempt.tokens, tokens, seek, size)
        for start, end, piece in pieces:
            text = tokenizer.decode([t for t in piece if t < tokens.eot])
            if start == end or not text.strip():
                continue
            all_tokens += piece
            segments.append(Segment(len(segments) + 1, start, end, text, piece, attempt.temperature,
                                    attempt.avg_logprob, attempt.compression_ratio, attempt.no_speech_prob, seek))
        logger.debug("seek %d -> %d frames (%.2f s), %d segments so far", seek, next_seek,
                     next_seek * FRAME_SECONDS, len(segments))
        seek = next_seek
        if not opts.condition_on_previous_text or attempt.temperature > opts.prompt_reset_on_temperature:
            reset_since = len(all_tokens)
    return Transcription("".join(s.text for s in segments), language or "en", language_prob,
                         content_frames * FRAME_SECONDS, segments)


def _is_silence(attempt: _Attempt, opts: TranscriptionOptions) -> bool:
    if opts.no_speech_threshold is None or attempt.no_speech_prob <= opts.no_speech_threshold:
        return False
    return opts.log_prob_threshold is None or attempt.avg_logprob <= opts.log_prob_threshold


def _decode_with_fallback(window, prompt, tokens: WhisperTokens, tokenizer, opts: TranscriptionOptions,
                          language: str | None, max_length: int):
    """Decode one window at rising temperatures until it passes the thresholds (openai-whisper's rule)."""
    tried: list[_Attempt] = []
    below_ratio: list[_Attempt] = []
    detected_prob = None
    checks = opts.compression_ratio_threshold is not None or opts.log_prob_threshold is not None
    for i, temperature in enumerate(opts.temperatures):
        rules = WindowRules(tokens, language, opts.task, not opts.without_timestamps, opts.max_initial_timestamp)
        room = max_length - len(prompt)
        max_tokens = room if opts.max_new_tokens is None else min(room, opts.max_new_tokens + rules.num_forced)
        params = window_params(opts, temperature, max_tokens, rules)
        out = yield DecodeJob(list(prompt), window, params, rules, checks and i + 1 < len(opts.temperatures))
        if language is None:
            language, detected_prob = rules.language, rules.language_prob
        attempt = _attempt(out, rules, tokens, tokenizer, temperature)
        tried.append(attempt)
        logger.debug("window: temperature %.1f, %d tokens, compression ratio %.2f, avg logprob %.3f, no speech %.3f",
                     temperature, len(attempt.tokens), attempt.compression_ratio, attempt.avg_logprob,
                     attempt.no_speech_prob)
        fallback = False
        if opts.compression_ratio_threshold is not None:
            if attempt.compression_ratio > opts.compression_ratio_threshold:
                fallback = True   # too repetitive
            else:
                below_ratio.append(attempt)
        if opts.log_prob_threshold is not None and attempt.avg_logprob < opts.log_prob_threshold:
            fallback = True       # too unlikely
        if _is_silence(attempt, opts) and opts.log_prob_threshold is not None:
            fallback = False      # silence: nothing better to find
        if not fallback:
            return attempt, language, detected_prob
    best = max(below_ratio or tried, key=lambda a: a.avg_logprob)
    best.temperature = opts.temperatures[-1]   # for the context reset rule, as the references do
    return best, language, detected_prob


def window_params(opts: TranscriptionOptions, temperature: float, max_tokens: int, rules: WindowRules
                  ) -> SamplingParams:
    """One window decode's SamplingParams: beam search at temperature 0 when opts.beam_size is set (its
    best sequence), else greedy at 0 and best_of samples above (one encoder run for all: scheduler.py)."""
    common = dict(max_tokens=max_tokens, logprobs=0, skip_special_tokens=False, logits_processors=[rules])
    if temperature == 0 and opts.beam_size is not None:   # beams ranked on the rules' renormalized logprobs
        common["logits_processors"] = [rules, _renormalize]
        return SamplingParams(temperature=0, use_beam_search=True, best_of=opts.beam_size, early_stopping=True,
                              patience=opts.patience, length_penalty=opts.length_penalty, **common)
    return SamplingParams(n=opts.best_of if temperature > 0 else 1, temperature=temperature, seed=opts.seed,
                          **common)


def _renormalize(output_ids: list[int], logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities again after the window rules banned tokens, as openai-whisper / CTranslate2 rank
    beams (the engine's beam search hands processors raw log-probabilities and does not renormalize)."""
    return torch.log_softmax(logprobs.float(), dim=-1).to(logprobs.dtype)


def _attempt(out: RequestOutput, rules: WindowRules, tokens: WhisperTokens, tokenizer,
             temperature: float) -> _Attempt:
    """The decode's result: its most likely sample (by average log-probability) when it drew several."""
    return max((_one(c, rules, tokens, tokenizer, temperature) for c in out.outputs), key=lambda a: a.avg_logprob)


def _one(completion, rules: WindowRules, tokens: WhisperTokens, tokenizer, temperature: float) -> _Attempt:
    ids = completion.token_ids[rules.num_forced:]
    logprobs = [lp[t] for t, lp in zip(completion.token_ids, completion.logprobs or [])][rules.num_forced:]
    text_ids = ids[:-1] if ids and ids[-1] == tokens.eot else ids
    cumulative = sum(logprobs)
    avg = cumulative / (len(text_ids) + 1)
    text = tokenizer.decode([t for t in text_ids if t < tokens.eot]).strip()
    return _Attempt(text_ids, avg, compression_ratio(text), temperature, rules.no_speech_prob or 0.0)


def _split_by_timestamps(ids: list[int], tokens: WhisperTokens, seek: int, size: int
                         ) -> tuple[list[tuple[float, float, list[int]]], int]:
    """(start s, end s, tokens) of each segment the window's timestamp pairs delimit, and the next seek."""
    tb = tokens.timestamp_begin
    offset = seek * FRAME_SECONDS
    single_ending = len(ids) >= 2 and ids[-2] < tb <= ids[-1]
    pairs = [i for i in range(1, len(ids)) if ids[i] >= tb and ids[i - 1] >= tb]
    if not pairs:
        duration = size * FRAME_SECONDS
        stamps = [t for t in ids if t >= tb]
        if stamps and stamps[-1] != tb:
            duration = (stamps[-1] - tb) * TIME_PRECISION
        return [(offset, offset + duration, ids)], seek + size
    cuts = pairs + ([len(ids)] if single_ending else [])
    pieces, last = [], 0
    for cut in cuts:
        piece = ids[last:cut]
        pieces.append((offset + (piece[0] - tb) * TIME_PRECISION, offset + (piece[-1] - tb) * TIME_PRECISION, piece))
        last = cut
    if single_ending:
        return pieces, seek + size
    return pieces, seek + (ids[last - 1] - tb) * INPUT_STRIDE
