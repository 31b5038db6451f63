"""Audio in: any container / codec FFmpeg reads (through PyAV), or raw samples, as float32 mono 16 kHz.

Decoding and resampling are FFmpeg's (libswresample via av.AudioResampler), never done by hand. Bad input
raises errors.RequestError with a one-line message (the server maps it to HTTP 400).
"""
from __future__ import annotations

import io
import logging
import os

import numpy as np

from scaleinfer.errors import RequestError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SAMPLE_RATE = 4000
"""Below this the speech band (up to ~4 kHz) is gone: such audio is refused rather than guessed at."""
MAX_SAMPLE_RATE = 384000
DEFAULT_MAX_SECONDS = 4 * 3600.0
"""Longest audio accepted by default (callers may pass their own limit)."""


def load_audio(source: str | bytes | os.PathLike | np.ndarray, sample_rate: int | None = None,
               max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """float32 mono samples at 16 kHz of `source`: a file path, the bytes of a file, or an array of samples
    (then `sample_rate` says their rate; [n] mono or [n, channels], float in [-1, 1] or int16)."""
    if isinstance(source, np.ndarray):
        audio = _from_array(source, sample_rate)
    else:
        if sample_rate is not None:
            raise RequestError("sample_rate applies to raw sample arrays only; a file states its own rate")
        audio = _decode(source)
    if audio.size == 0:
        raise RequestError("the audio is empty (no samples); send a recording with speech in it")
    seconds = audio.size / SAMPLE_RATE
    if max_seconds is not None and seconds > max_seconds:
        raise RequestError(f"the audio is {seconds:.0f} s long, more than the limit of {max_seconds:.0f} s; "
                           f"split it or raise the limit")
    return audio


def _check_rate(rate: int | None) -> int:
    if rate is None or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise RequestError(f"unsupported sample rate {rate} Hz; audio must be sampled at {MIN_SAMPLE_RATE}-"
                           f"{MAX_SAMPLE_RATE} Hz (16000 Hz is native)")
    return rate


def _from_array(samples: np.ndarray, sample_rate: int | None) -> np.ndarray:
    if sample_rate is None:
        raise RequestError("raw samples need their sample_rate (e.g. sample_rate=16000)")
    _check_rate(sample_rate)
    x = samples
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise RequestError(f"raw samples must be [n] or [n, channels], got shape {samples.shape}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise RequestError(f"raw samples must be float or int16, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sample_rate == SAMPLE_RATE or x.size == 0:
        return x
    return _resample_array(x, sample_rate)


def _resample_array(x: np.ndarray, rate: int) -> np.ndarray:
    """FFmpeg's resampler over one mono float frame."""
    import av

    frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _decode(source) -> np.ndarray:
    """Decode the first audio stream of a file (path or bytes) and resample it to 16 kHz mono float32."""
    import av

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise RequestError("the audio file is empty (0 bytes); send a recording")
        source = io.BytesIO(source)
    name = source if isinstance(source, (str, os.PathLike)) else "the upload"
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except FileNotFoundError:
        raise RequestError(f"audio file not found: {name}") from None
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise RequestError(f"could not read {name} as audio ({_reason(exc)}); send a WAV, FLAC, MP3, OGG, "
                           f"M4A or WebM file") from None
    with container:
        if not container.streams.audio:
            raise RequestError(f"{name} has no audio stream; send a recording")
        stream = container.streams.audio[0]
        _check_rate(stream.codec_context.sample_rate or stream.rate)
        # Channels are averaged here, after resampling each: FFmpeg's own downmix scales stereo by 1/sqrt(2)
        # per channel (sqrt(2) times the mean), which overflows [-1, 1] on loud recordings.
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                frame.pts = None   # timestamps are irrelevant here; gaps in them confuse the resampler
                chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
        except (av.error.FFmpegError, ValueError) as exc:
            if not chunks:
                raise RequestError(f"could not decode {name} as audio ({_reason(exc)})") from None
            logger.warning("%s: decoding stopped early (%s); using the %d samples before", name, _reason(exc),
                           sum(c.size for c in chunks))
        chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
