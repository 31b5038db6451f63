"""IncrementalDetokenizer: CJK and emoji split over byte tokens appear whole and once; stop strings
never leak, even across tokens."""
from __future__ import annotations

import pytest

from scaleinfer.tokenizer import IncrementalDetokenizer, Tokenizer
from scaleinfer.weights import gguf

TEXTS = ["北京欢迎你！红楼梦是一部伟大的小说。", "吾輩は猫である 😀🎉👍🏽 👨‍👩‍👧‍👦", "naïve café 🇫🇷 done", "plain ascii text"]


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(gguf.tokenizer_fields(gguf.open_reader(smollm2_gguf_path)))


def stream(tok, ids, **kw):
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"), **kw)
    deltas = [detok.add_tokens([i]) for i in ids]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters(tok, text):
    ids = tok.encode(text)
    # Multi-byte characters really are split over several byte-level tokens in this vocabulary.
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_many_tokens_at_once(tok):
    ids = tok.encode(TEXTS[1])
    detok = IncrementalDetokenizer(tok, [])
    out = detok.add_tokens(ids[:5]) + detok.add_tokens(ids[5:]) + detok.flush()
    assert out == TEXTS[1]


def test_stop_string_spanning_tokens_never_leaks(tok):
    text = "Answer: the result is STOPHERE and more text"
    ids = tok.encode(text)
    detok, deltas = stream(tok, ids, stop=["STOPHERE"])
    released = "".join(deltas)
    assert released == "Answer: the result is " == detok.text
    assert detok.stop_string == "STOPHERE"
    # No intermediate delta ever showed a piece of the stop string.
    assert "STOP" not in released


def test_include_stop_string(tok):
    ids = tok.encode("one two three four")
    detok, deltas = stream(tok, ids, stop=["three"], include_stop_str_in_output=True)
    assert "".join(deltas) == "one two three" and detok.stop_string == "three"


def test_held_back_prefix_released_on_flush(tok):
    ids = tok.encode("the end is nea")
    detok = IncrementalDetokenizer(tok, [], stop=["near the end"])
    text = "".join(detok.add_tokens([i]) for i in ids)
    assert not text.endswith("nea")  # "nea" could still grow into the stop string
    assert text + detok.flush() == "the end is nea"
    assert detok.stop_string is None


def test_chinese_stop_string(tok):
    ids = tok.encode("北京欢迎你！红楼梦")
    detok, deltas = stream(tok, ids, stop=["！"])
    assert "".join(deltas) == "北京欢迎你" and detok.stop_string == "！"


def test_special_tokens_skipped(tok):
    ids = tok.encode("Hello<|im_end|>")
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == "Hello"
    detok, deltas = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == "Hello<|im_end|>"
