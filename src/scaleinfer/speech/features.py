"""Whisper's log-mel features in torch: 25 ms Hann windows every 10 ms (n_fft 400, hop 160 at 16 kHz),
power spectrum, Slaney-style mel filters (80 or 128 bins), log10 clamped to 8 below the maximum of the
whole recording, scaled to about [-1, 1]: the same numbers as openai-whisper, faster-whisper and HF's
WhisperFeatureExtractor (tests/speech check 1e-4 against the last two).

    features = log_mel_spectrogram(audio)           [n_mels, frames]  (audio: float32 16 kHz)
    window = pad_or_trim(features[:, seek:seek + 3000])   one 30 s encoder input
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

N_FFT = 400
HOP_LENGTH = 160
SAMPLE_RATE = 16000
N_FRAMES = 3000
"""Mel frames of one 30 s window (the encoder's input length)."""


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] float32: triangular filters on the Slaney mel scale (linear below 1 kHz,
    logarithmic above), centres evenly spaced from 0 Hz to the Nyquist frequency, each normalized to
    unit area (2 / bandwidth), as librosa.filters.mel(norm="slaney") builds them."""
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0

    def hz_to_mel(f: float) -> float:
        return f / f_sp if f < min_log_hz else min_log_mel + math.log(f / min_log_hz) / logstep

    mels = np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2)
    freqs = np.where(mels < min_log_mel, f_sp * mels, min_log_hz * np.exp(logstep * (mels - min_log_mel)))
    widths = np.diff(freqs)
    ramps = freqs[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (freqs[2:] - freqs[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int = 80, padding: int = HOP_LENGTH
                        ) -> torch.Tensor:
    """[n_mels, frames] float32 features of float32 16 kHz mono `audio`, zero-padded by `padding` samples
    first (faster-whisper pads 160; openai-whisper 30 s). frames = (len + padding) // 160 + 1 - 1: the
    last STFT frame is dropped, as the references do."""
    x = torch.as_tensor(audio, dtype=torch.float32)
    if padding:
        x = F.pad(x, (0, padding))
    window = torch.hann_window(N_FFT, dtype=torch.float32)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2
    mel = mel_filters(n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(features: torch.Tensor, frames: int = N_FRAMES) -> torch.Tensor:
    """[n_mels, frames]: cut, or pad with zeros at the end (as the references pad a last short window)."""
    n = features.shape[-1]
    if n > frames:
        return features[:, :frames]
    if n < frames:
        return F.pad(features, (0, frames - n))
    return features
