"""whisper-base (the catalog's CTranslate2 float16 weights) against the references on the same weights:
the transcript of jfk.flac equals faster-whisper's greedy one, token for token and timestamp for timestamp;
the decoder's logits match HF WhisperForConditionalGeneration (loaded with the same weights, converted)
within 1e-3 for the first steps; the log-mel features match faster-whisper's and HF's within 1e-4; and
several recordings transcribed together (their windows batched) equal each transcribed alone."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from scaleinfer.speech.audio import load_audio
from scaleinfer.speech.features import log_mel_spectrogram, pad_or_trim

pytestmark = pytest.mark.slow
JFK = str(pathlib.Path(__file__).resolve().parents[2] / "data" / "jfk.flac")


@pytest.fixture(scope="module")
def llm():
    from scaleinfer import LLM

    return LLM("whisper-base", threads=1, kv_cache_memory="256MiB")


@pytest.fixture(scope="module")
def audio():
    return load_audio(JFK)


def test_features_match_references(audio):
    FeatureExtractor = pytest.importorskip("faster_whisper.feature_extractor").FeatureExtractor
    from transformers import WhisperFeatureExtractor

    ours = log_mel_spectrogram(audio).numpy()
    assert np.abs(ours - FeatureExtractor(80)(audio)).max() < 1e-4
    for n_mels in (80, 128):
        hf = WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16000, return_tensors="np")
        padded = pad_or_trim(log_mel_spectrogram(np.pad(audio, (0, 480000 - len(audio))), n_mels, padding=0))
        assert np.abs(padded.numpy() - hf.input_features[0]).max() < 1e-4


def test_transcript_equals_faster_whisper(llm, audio):
    WhisperModel = pytest.importorskip("faster_whisper").WhisperModel

    model_dir = llm.engine.checkpoint_path
    fw = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=1)
    for without_timestamps in (False, True):
        segments, info = fw.transcribe(audio, beam_size=1, without_timestamps=without_timestamps)
        ref = list(segments)
        from scaleinfer.speech.transcribe import TranscriptionOptions

        ours = llm.transcribe(audio, sample_rate=16000,
                              options=TranscriptionOptions(without_timestamps=without_timestamps))
        assert ours.language == info.language == "en"
        assert abs(ours.language_probability - info.language_probability) < 1e-2
        assert [s.tokens for s in ours.segments] == [s.tokens for s in ref]
        assert [x for s in ours.segments for x in (s.start, s.end)] == pytest.approx(
            [x for s in ref for x in (s.start, s.end)])
        assert ours.text == "".join(s.text for s in ref)
        for a, b in zip(ours.segments, ref):
            assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-2)
            assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-2)


def _hf_model(llm):
    from scaleinfer.weights.loader import open_checkpoint
    from tests.parity.whisper_hf_helpers import hf_whisper

    return hf_whisper(llm.engine.model_config, open_checkpoint("whisper-base").tensors())


def test_decoder_logits_match_hf(audio):
    from scaleinfer import LLM
    from scaleinfer.sampling_params import SamplingParams

    llm = LLM("whisper-base", threads=1, kv_cache_memory="256MiB", kv_cache_dtype="float32")
    features = pad_or_trim(log_mel_spectrogram(audio))
    prompt = [50258, 50259, 50359, 50363]   # SOT, en, transcribe, notimestamps
    reference = [400, 370, 452, 7177, 6280, 11]   # " And so my fellow Americans,"
    seen = []

    def record_and_force(output_ids, logits):
        seen.append(logits.clone())
        forced = torch.full_like(logits, -float("inf"))
        forced[reference[len(output_ids)]] = 0
        return forced

    params = SamplingParams(temperature=0, max_tokens=len(reference), logits_processors=[record_and_force])
    llm.engine.add_request("probe", prompt, params, encoder_input=features)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    hf = _hf_model(llm)
    with torch.inference_mode():
        ids = torch.tensor([prompt + reference[:-1]])
        hf_logits = hf(input_features=features[None], decoder_input_ids=ids).logits[0, len(prompt) - 1:]
    ours = torch.stack(seen)
    assert ours.shape == hf_logits.shape
    assert (ours - hf_logits).abs().max() < 1e-3
    assert ours.argmax(-1).tolist() == reference


def test_batched_equals_alone(llm, audio):
    clips = [audio, audio[:16000 * 6], np.concatenate([audio[16000 * 5:], audio[:16000 * 4]])]
    alone = [llm.transcribe(c, sample_rate=16000) for c in clips]
    together = llm.transcribe(clips, sample_rate=16000)
    for a, b in zip(alone, together):
        assert [s.tokens for s in a.segments] == [s.tokens for s in b.segments]
        assert a.text == b.text
    assert llm.engine.stats.max_batch_size >= 2
