"""speech/ without a model: audio decoding and its errors, output formats, the window splitter and the
timestamp rules of the logits processor."""
from __future__ import annotations

import io
import math
import pathlib
import wave

import numpy as np
import pytest
import torch

from scaleinfer.errors import RequestError
from scaleinfer.speech.audio import load_audio
from scaleinfer.speech.decoding import WhisperTokens, WindowRules
from scaleinfer.speech.formats import language_code, render, to_srt, to_vtt
from scaleinfer.speech.transcribe import Segment, Transcription, _split_by_timestamps, compression_ratio

JFK = pathlib.Path(__file__).resolve().parents[3] / "data" / "jfk.flac"


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def test_decodes_and_resamples_to_16k_mono():
    audio = load_audio(str(JFK))                 # 44.1 kHz stereo FLAC
    assert audio.dtype == np.float32 and audio.shape == (176000,) and np.abs(audio).max() <= 1.0
    tone = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32) * 0.5
    stereo = np.stack([tone, tone], axis=1).reshape(-1)
    out = load_audio(wav_bytes(stereo, 8000, channels=2))
    assert abs(out.size - 16000) <= 32 and 0.45 < np.abs(out[100:-100]).max() < 0.55   # mean of channels
    same = load_audio((tone * 32767).astype(np.int16), sample_rate=8000)
    assert abs(same.size - 16000) <= 32


@pytest.mark.parametrize("source, kwargs, words", [
    (b"", {}, "empty"),
    (b"definitely not audio", {}, "could not read the upload as audio"),
    (wav_bytes(np.zeros(200), 2000), {}, "unsupported sample rate 2000 Hz"),
    (np.zeros(16000, np.float32), {}, "need their sample_rate"),
    (np.zeros(16000, np.float32), {"sample_rate": 100}, "unsupported sample rate 100 Hz"),
    (np.zeros(0, np.float32), {"sample_rate": 16000}, "the audio is empty"),
    (np.zeros(16000 * 5, np.float32), {"sample_rate": 16000, "max_seconds": 2}, "5 s long, more than the limit"),
    ("/no/such/file.wav", {}, "not found"),
])
def test_bad_audio_is_one_clear_error(source, kwargs, words):
    with pytest.raises(RequestError, match=words):
        load_audio(source, **kwargs)


def test_formats():
    segs = [Segment(1, 0.0, 7.6, " Hello there,", [1], 0.0, -0.2, 1.2, 0.01, 0),
            Segment(2, 7.6, 3725.25, " world.", [2], 0.0, -0.2, 1.2, 0.01, 0)]
    t = Transcription(" Hello there, world.", "en", 0.9, 3726.0, segs)
    assert to_srt(t) == ("1\n00:00:00,000 --> 00:00:07,600\nHello there,\n\n"
                         "2\n00:00:07,600 --> 01:02:05,250\nworld.\n")
    assert to_vtt(t).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:07.600\nHello there,\n")
    assert render(t, "json", "transcribe") == {"text": "Hello there, world."}
    verbose = render(t, "verbose_json", "translate")
    assert verbose["language"] == "english" and verbose["task"] == "translate" and verbose["segments"][1]["id"] == 1
    assert language_code("German") == "de" and language_code("en") == "en" and language_code(None) is None
    with pytest.raises(RequestError, match="unknown language"):
        language_code("klingon")
    assert compression_ratio("la " * 100) > 2.4 > compression_ratio("And so my fellow Americans")


TOKENS = WhisperTokens(sot=50258, eot=50257, sot_prev=50361, no_speech=50362, transcribe=50359, translate=50358,
                       no_timestamps=50363, timestamp_begin=50364, languages={"en": 50259, "de": 50261},
                       suppress=(1, 2), suppress_begin=(220, 50257))


def test_split_by_timestamps():
    tb = TOKENS.timestamp_begin
    ids = [tb, 10, 11, tb + 100, tb + 100, 12, tb + 250]          # two pairs, then a lone final timestamp
    pieces, seek = _split_by_timestamps(ids, TOKENS, seek=1000, size=3000)
    assert [(round(a, 2), round(b, 2)) for a, b, _ in pieces] == [(10.0, 12.0), (12.0, 15.0)]
    assert seek == 1000 + 3000                                     # single timestamp ending: whole window
    pieces, seek = _split_by_timestamps([tb, 10, tb + 100, tb + 100, 12], TOKENS, seek=0, size=3000)
    assert len(pieces) == 1 and seek == 200                        # unfinished: seek to the last timestamp
    pieces, seek = _split_by_timestamps([10, 11], TOKENS, seek=0, size=1500)
    assert pieces == [(0.0, 15.0, [10, 11])] and seek == 1500


def test_window_rules_force_the_task_and_pair_timestamps():
    vocab = 51865
    rules = WindowRules(TOKENS, None, "translate", timestamps=True)
    logits = torch.zeros(vocab)
    logits[50261] = 5.0                                            # <|de|> most likely
    out = rules(list(), logits.clone())
    assert rules.language == "de" and int(out.argmax()) == 50261 and math.isinf(out[50259])
    assert int(rules([50261], torch.zeros(vocab)).argmax()) == TOKENS.translate
    first = rules([50261, 50358], torch.zeros(vocab))
    tb = TOKENS.timestamp_begin
    assert torch.isinf(first[:tb]).all() and not math.isinf(first[tb + 50]) and math.isinf(first[tb + 51])
    after_text = rules([50261, 50358, tb, 400], torch.zeros(vocab))
    assert math.isinf(after_text[tb]) and not math.isinf(after_text[tb + 1])   # never decreasing
    lone = rules([50261, 50358, tb, 400, tb + 30], torch.zeros(vocab))
    assert torch.isinf(lone[:TOKENS.eot]).all()                    # a lone timestamp: its pair (or the end) next
    no_ts = WindowRules(TOKENS, "en", "transcribe", timestamps=False)
    assert int(no_ts([50259, 50359], torch.zeros(vocab)).argmax()) == TOKENS.no_timestamps
    blank = no_ts([50259, 50359, 50363], torch.zeros(vocab))
    assert math.isinf(blank[220]) and math.isinf(blank[1]) and not math.isinf(blank[400])
