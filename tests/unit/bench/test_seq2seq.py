"""bench seq2seq's word error rate (the number its table compares engines by) and its options."""
import argparse

import pytest

from scaleinfer.bench.seq2seq import JFK_TEXT, add_arguments, word_error_rate


def test_word_error_rate():
    assert word_error_rate(JFK_TEXT.upper().replace(",", ""), JFK_TEXT) == 0.0
    assert word_error_rate("and so my fellow", "and so my fellow americans") == 1 / 5        # a deletion
    assert word_error_rate("and so so my fellow", "and so my fellow") == 1 / 4               # an insertion
    assert word_error_rate("and to my fellow", "and so my fellow") == 1 / 4                  # a substitution
    assert word_error_rate(JFK_TEXT + " " + JFK_TEXT, JFK_TEXT) == 1.0


def test_compression_ratio_threshold_option():
    """--compression-ratio-threshold: a positive number, or none (the check off in every engine)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).compression_ratio_threshold == 2.4
    assert p.parse_args(["--compression-ratio-threshold", "none"]).compression_ratio_threshold is None
    assert p.parse_args(["--compression-ratio-threshold", "3"]).compression_ratio_threshold == 3.0
    with pytest.raises(SystemExit):
        p.parse_args(["--compression-ratio-threshold", "-1"])
