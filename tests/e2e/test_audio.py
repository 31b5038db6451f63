"""The OpenAI audio routes on a real `scaleinfer serve --model whisper-base`, driven by the official
`openai` client: transcription and translation in every response format, streaming, and bad audio -> 400."""
from __future__ import annotations

import io
import json
import pathlib
import wave

import numpy as np
import pytest

from tests.e2e.conftest import TIMEOUT_S

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

JFK = pathlib.Path(__file__).resolve().parents[2] / "data" / "jfk.flac"
TEXT = "And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."


@pytest.fixture(scope="module")
def whisper_server(start_server):
    with start_server("--model", "whisper-base", "--kv-cache-memory", "256MiB") as server:
        yield server


@pytest.fixture(scope="module")
def oclient(whisper_server):
    return openai.OpenAI(base_url=whisper_server.v1, api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def model(oclient) -> str:
    return oclient.models.list().data[0].id


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype(np.int16).tobytes())
    return buf.getvalue()


def test_transcription_formats(oclient, model):
    with open(JFK, "rb") as f:
        out = oclient.audio.transcriptions.create(file=f, model=model)
    assert out.text == TEXT
    with open(JFK, "rb") as f:
        verbose = oclient.audio.transcriptions.create(file=f, model=model, response_format="verbose_json",
                                                      timestamp_granularities=["segment"])
    assert verbose.language == "english" and verbose.text == TEXT and abs(verbose.duration - 11.0) < 0.05
    assert [(s.start, s.end) for s in verbose.segments] == [(0.0, 7.6), (7.6, 10.6)]
    with open(JFK, "rb") as f:
        srt = oclient.audio.transcriptions.create(file=f, model=model, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:07,600\nAnd so my fellow Americans")
    with open(JFK, "rb") as f:
        vtt = oclient.audio.transcriptions.create(file=f, model=model, response_format="vtt", language="en")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:07.600\n")
    with open(JFK, "rb") as f:
        text = oclient.audio.transcriptions.create(file=f, model=model, response_format="text")
    assert text.strip() == TEXT


def test_translation(oclient, model):
    with open(JFK, "rb") as f:
        out = oclient.audio.translations.create(file=f, model=model)
    assert out.text == TEXT   # English speech "translated" to English


def test_streamed_transcription(oclient, model):
    with open(JFK, "rb") as f:
        events = list(oclient.audio.transcriptions.create(file=f, model=model, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) == 2 and "".join(deltas) == TEXT
    assert events[-1].type == "transcript.text.done" and events[-1].text == TEXT


@pytest.mark.parametrize("name, payload, words", [
    ("notes.txt", b"this is not audio at all", "could not read the upload as audio"),
    ("empty.wav", b"", "empty"),
    ("low.wav", _wav(np.zeros(2000), 2000), "unsupported sample rate 2000 Hz"),
])
def test_bad_audio_is_400(oclient, model, name, payload, words):
    with pytest.raises(openai.BadRequestError) as err:
        oclient.audio.transcriptions.create(file=(name, payload), model=model)
    assert words in json.dumps(err.value.body)


def test_bad_parameters_are_400(oclient, model):
    with open(JFK, "rb") as f, pytest.raises(openai.BadRequestError, match="response_format"):
        oclient.audio.transcriptions.create(file=f, model=model, response_format="mp3")
    with open(JFK, "rb") as f, pytest.raises(openai.BadRequestError, match="unknown language"):
        oclient.audio.transcriptions.create(file=f, model=model, language="xx")
    with open(JFK, "rb") as f, pytest.raises(openai.NotFoundError):
        oclient.audio.transcriptions.create(file=f, model="no-such-model")


def test_every_kv_block_back_after_transcriptions(whisper_server, oclient, model):
    # A window's first decode keeps its encoder output for a temperature fallback (kv_cache/kept_encoder.py);
    # once the transcription moves on (here: ends), plain and streamed, nothing stays behind.
    with open(JFK, "rb") as f:
        assert oclient.audio.transcriptions.create(file=f, model=model).text == TEXT
    with open(JFK, "rb") as f:
        list(oclient.audio.transcriptions.create(file=f, model=model, stream=True))
    assert whisper_server.metric("scaleinfer_kv_cache_free_blocks") == whisper_server.metric("scaleinfer_kv_cache_blocks")
