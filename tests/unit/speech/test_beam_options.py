"""Whisper beam search options (speech/transcribe.py): validated up front with one-line errors, turned into
beam-search SamplingParams at temperature 0 only, greedy by default (the server and CLI defaults)."""
from __future__ import annotations

import pathlib
import re

import pytest

from scaleinfer.cli import main
from scaleinfer.errors import RequestError
from scaleinfer.speech.transcribe import TranscriptionOptions, window_params

JFK = str(pathlib.Path(__file__).resolve().parents[3] / "data" / "jfk.flac")


@pytest.mark.parametrize("beam_size", [0, -1, 17, 2.5, True, "5"])
def test_invalid_beam_size_is_a_clear_error(beam_size):
    with pytest.raises(RequestError, match=r"^beam_size must be an integer from 1 to 16, got "):
        TranscriptionOptions(beam_size=beam_size)


@pytest.mark.parametrize("kwargs, words", [({"patience": 0.0}, "patience must be in (0, 16]"),
                                           ({"length_penalty": 11.0}, "length_penalty must be between -10 and 10")])
def test_invalid_beam_knobs(kwargs, words):
    with pytest.raises(RequestError, match=re.escape(words)):
        TranscriptionOptions(beam_size=5, **kwargs)


def test_beam_search_at_temperature_zero_only():
    greedy = window_params(TranscriptionOptions(), 0.0, 100, rules=None)
    assert not greedy.use_beam_search and greedy.n == 1 and greedy.temperature == 0
    opts = TranscriptionOptions(beam_size=5, patience=2.0, length_penalty=0.5, seed=3)
    beam = window_params(opts, 0.0, 100, rules=None)
    assert beam.use_beam_search and beam.beam_width == 5 and beam.n == 1 and beam.early_stopping is True
    assert (beam.patience, beam.length_penalty, beam.max_tokens, beam.logprobs) == (2.0, 0.5, 100, 0)
    hot = window_params(opts, 0.4, 100, rules=None)
    assert not hot.use_beam_search and hot.n == opts.best_of == 5 and hot.seed == 3 and hot.temperature == 0.4


@pytest.mark.parametrize("value", ["0", "-2"])
def test_cli_bad_beam_size_is_one_line_before_loading(value, capsys):
    assert main(["transcribe", JFK, "--beam-size", value]) == 2
    err = capsys.readouterr().err
    assert err == f"error: beam_size must be an integer from 1 to 16, got {value}\n"
