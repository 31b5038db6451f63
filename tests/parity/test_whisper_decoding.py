"""whisper-base on jfk.flac, best_of sampling and beam search (speech/transcribe.py):

- best_of=5 at a temperature above 0 runs the encoder once (the five samples share its cross blocks,
  scheduler.py) and gives the very samples that five encoder runs give (Scheduler.share_encoder=False:
  the code before the sharing);
- beam_size=5 at temperature 0 gives the known transcript (data/README.md; without timestamps) and runs
  the encoder once; with timestamps it finds a likelier sequence than greedy (sum of the renormalized
  log-probabilities beams rank on) and equals faster-whisper's beam-5 transcript token for token;
- the CLI's --beam-size prints the API's beam transcript (not the greedy one);
- a window decoded again by the temperature fallback reuses its encoder output (one run for all
  temperatures, the same segments as an encoder run per temperature, every block back after)."""
from __future__ import annotations

import math
import pathlib

import pytest
import torch

from scaleinfer.sampling_params import SamplingParams
from scaleinfer.scheduler import Scheduler
from scaleinfer.speech.drivers import prepare
from scaleinfer.speech.transcribe import TranscriptionOptions

pytestmark = pytest.mark.slow
JFK = str(pathlib.Path(__file__).resolve().parents[2] / "data" / "jfk.flac")
README = pathlib.Path(__file__).resolve().parents[2] / "data" / "README.md"


def known_transcript() -> str:
    """whisper-base's transcript of jfk.flac as data/README.md states it."""
    line = next(ln for ln in README.read_text().splitlines() if ln.startswith("| jfk.flac"))
    return line.split('transcribes it "')[1].split('" |')[0]


@pytest.fixture(scope="module")
def llm():
    from scaleinfer import LLM

    return LLM("whisper-base", threads=1, kv_cache_memory="256MiB")


@pytest.fixture
def encoder_inputs(llm, monkeypatch):
    """The number of inputs each model.encode call got."""
    calls = []
    original = llm.engine.model.encode

    def counting(inputs):
        calls.append(len(inputs))
        return original(inputs)

    monkeypatch.setattr(llm.engine.model, "encode", counting)
    return calls


def first_window(llm, opts: TranscriptionOptions):
    """The DecodeJob of jfk.flac's (only) window at opts.temperatures[0]."""
    return next(prepare(JFK, opts, llm.tokenizer, llm.engine.model_config, llm.engine.max_model_len))


def run(llm, job):
    request_id = f"probe-{llm.engine.new_request_id()}"
    llm.engine.add_request(request_id, job.prompt_ids, job.params, encoder_input=job.encoder_input)
    final = None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.request_id == request_id and out.finished:
                final = out
    return final


def sum_logprob(completion, num_forced: int) -> float:
    """Sum of the log-probabilities of the sampled (not forced) tokens, as transcribe's avg_logprob sums them."""
    return sum([lp[t] for t, lp in zip(completion.token_ids, completion.logprobs)][num_forced:])


def test_best_of_five_samples_share_one_encoder_run(llm, encoder_inputs, monkeypatch):
    opts = TranscriptionOptions(temperatures=(1.0,), best_of=5, seed=11)
    shared = run(llm, first_window(llm, opts))
    assert sum(encoder_inputs) == 1 and len(shared.outputs) == 5
    monkeypatch.setattr(Scheduler, "share_encoder", False)
    encoder_inputs.clear()
    alone = run(llm, first_window(llm, opts))
    assert sum(encoder_inputs) == 5
    assert [o.token_ids for o in shared.outputs] == [o.token_ids for o in alone.outputs]
    assert len({tuple(o.token_ids) for o in shared.outputs}) > 1   # five real samples, not one repeated
    for a, b in zip(shared.outputs, alone.outputs):
        assert sum_logprob(a, 2) == pytest.approx(sum_logprob(b, 2), abs=1e-3)
    assert llm.engine.num_free_blocks == llm.engine.num_kv_blocks   # every cross block came back


def test_best_of_transcription_same_with_one_encoder_run(llm, encoder_inputs, monkeypatch):
    opts = TranscriptionOptions(temperatures=(0.6,), best_of=5, seed=3)
    shared = llm.transcribe(JFK, options=opts)
    runs_shared = sum(encoder_inputs)
    monkeypatch.setattr(Scheduler, "share_encoder", False)
    encoder_inputs.clear()
    alone = llm.transcribe(JFK, options=opts)
    assert runs_shared == 1 and sum(encoder_inputs) == 5
    assert [s.tokens for s in shared.segments] == [s.tokens for s in alone.segments]
    assert shared.text == alone.text


def test_temperature_fallback_reuses_the_window_encoder_output(llm, encoder_inputs, monkeypatch):
    # A compression-ratio threshold no text passes: every temperature is tried on the (one) window.
    opts = TranscriptionOptions(temperatures=(0.0, 0.5, 1.0), best_of=2, seed=5, compression_ratio_threshold=0.01)
    llm.transcribe(JFK)   # passes at temperature 0: what it kept for a fallback goes back when it ends
    assert llm.engine.num_free_blocks == llm.engine.num_kv_blocks
    encoder_inputs.clear()
    kept = llm.transcribe(JFK, options=opts)
    runs_kept = sum(encoder_inputs)
    assert llm.engine.num_free_blocks == llm.engine.num_kv_blocks   # released once the window was done
    monkeypatch.setattr(Scheduler, "keep_encoder", False)
    encoder_inputs.clear()
    alone = llm.transcribe(JFK, options=opts)
    assert runs_kept == 1 and sum(encoder_inputs) == 3
    assert [s.tokens for s in kept.segments] == [s.tokens for s in alone.segments]
    assert kept.segments[0].temperature == 1.0   # the fallback did run to the last temperature


def renormalized_sum_logprob(llm, opts: TranscriptionOptions, token_ids: list[int]) -> float:
    """Sum of the log-probabilities of token_ids' sampled (not forced) tokens after the window rules, renormalized
    (the measure beam search ranks on): the window decoded with each token forced in turn."""
    job = first_window(llm, opts)
    seen = []

    def record_and_force(output_ids, logits):
        seen.append(float(torch.log_softmax(logits.float(), dim=-1)[token_ids[len(output_ids)]]))
        forced = torch.full_like(logits, -math.inf)
        forced[token_ids[len(output_ids)]] = 0
        return forced

    job.params = SamplingParams(temperature=0, max_tokens=len(token_ids),
                                logits_processors=[job.rules, record_and_force])
    run(llm, job)
    assert len(seen) == len(token_ids)
    return sum(seen[job.rules.num_forced:])


def test_beam_five_known_transcript(llm, encoder_inputs):
    beam = llm.transcribe(JFK, options=TranscriptionOptions(without_timestamps=True, beam_size=5))
    assert sum(encoder_inputs) == 1   # the beams share the window's cross blocks too
    assert beam.text.strip() == known_transcript()


def test_beam_five_sum_logprob_at_least_greedy(llm):
    greedy = run(llm, first_window(llm, TranscriptionOptions())).outputs[0].token_ids
    beam = run(llm, first_window(llm, TranscriptionOptions(beam_size=5))).outputs[0].token_ids
    assert beam != greedy   # with timestamps the beam finds another sequence ("And so, my fellow ...")
    opts = TranscriptionOptions()
    assert renormalized_sum_logprob(llm, opts, beam) > renormalized_sum_logprob(llm, opts, greedy)
    assert llm.engine.num_free_blocks == llm.engine.num_kv_blocks


def test_beam_five_equals_faster_whisper(llm):
    WhisperModel = pytest.importorskip("faster_whisper").WhisperModel
    from scaleinfer.speech.audio import load_audio

    audio = load_audio(JFK)
    fw = WhisperModel(llm.engine.checkpoint_path, device="cpu", compute_type="float32", cpu_threads=1)
    segments, _ = fw.transcribe(audio, beam_size=5)
    ref = list(segments)
    ours = llm.transcribe(audio, sample_rate=16000, beam_size=5)
    assert [s.tokens for s in ours.segments] == [s.tokens for s in ref]
    assert ours.text == "".join(s.text for s in ref)


def test_cli_beam_size(llm, capsys):
    from scaleinfer.cli import main

    assert main(["transcribe", JFK, "--beam-size", "5", "--threads", "1", "--kv-cache-memory", "256MiB"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == llm.transcribe(JFK, beam_size=5).text.strip()
    assert printed != llm.transcribe(JFK).text.strip()   # not the greedy transcript: the flag took effect
