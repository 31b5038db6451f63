"""bench seq2seq's word error rate (the number its table compares engines by)."""
from scaleinfer.bench.seq2seq import JFK_TEXT, word_error_rate


def test_word_error_rate():
    assert word_error_rate(JFK_TEXT.upper().replace(",", ""), JFK_TEXT) == 0.0
    assert word_error_rate("and so my fellow", "and so my fellow americans") == 1 / 5        # a deletion
    assert word_error_rate("and so so my fellow", "and so my fellow") == 1 / 4               # an insertion
    assert word_error_rate("and to my fellow", "and so my fellow") == 1 / 4                  # a substitution
    assert word_error_rate(JFK_TEXT + " " + JFK_TEXT, JFK_TEXT) == 1.0
