"""IncrementalDetokenizer: CJK and emoji split over byte tokens appear whole and once; stop strings
never leak, even across tokens."""
from __future__ import annotations

import pytest

from scaleinfer.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["北京欢迎你！红楼梦是一部伟大的小说。", "吾輩は猫である 😀🎉👍🏽 👨‍👩‍👧‍👦", "naïve café 🇫🇷 done", "plain ascii text"]


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer) -> Tokenizer:
    return smollm2_tokenizer


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


def test_random_chunking_equals_full_decode(tok):
    import random

    rng = random.Random(0)
    for text in TEXTS + ["混合 mixed 🙂 text\n\twith\ttabs", "ค่ะ สวัสดี 👩🏽‍💻"]:
        ids = tok.encode(text)
        for _ in range(5):
            detok, deltas, i = IncrementalDetokenizer(tok, tok.encode("Q: ")), [], 0
            while i < len(ids):
                n = rng.randint(1, 4)
                deltas.append(detok.add_tokens(ids[i:i + n]))
                i += n
            deltas.append(detok.flush())
            assert "".join(deltas) == tok.decode(ids) == detok.text
            assert not any("\ufffd" in d for d in deltas)


def test_decode_window_stays_short(tok):
    """O(new tokens) per step: no call decodes more than a few tokens, however long the output."""
    lengths = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("北京欢迎你！ The quick brown fox 😀 jumps. " * 40)
    detok = IncrementalDetokenizer(Spy(), tok.encode("Prompt:"), stop=["never appears"])
    out = "".join(detok.add_tokens([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids) and len(ids) > 500
    assert max(lengths) <= 12


def test_earliest_stop_wins_and_nothing_after(tok):
    ids = tok.encode("alpha beta gamma delta")
    detok, deltas = stream(tok, ids, stop=["delta", "beta"])
    assert "".join(deltas) == "alpha " == detok.text and detok.stop_string == "beta"
    assert detok.finished and detok.add_tokens(tok.encode(" more")) == "" and detok.flush() == ""


def test_stop_at_the_very_start(tok):
    detok, deltas = stream(tok, tok.encode("STOP and the rest"), stop=["STOP"])
    assert "".join(deltas) == "" == detok.text and detok.stop_string == "STOP"


def test_false_start_is_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["abc"])
    assert detok.add_tokens(tok.encode("xab")) == "x"  # "ab" might begin the stop string
    assert detok.add_tokens(tok.encode("d")) == "abd"  # it did not
    assert detok.flush() == "" and detok.stop_string is None


def test_stop_inside_multibyte_text(tok):
    text = "红楼梦是一部伟大的小说。"
    ids = tok.encode(text)
    detok, deltas = stream(tok, ids, stop=["伟大"], include_stop_str_in_output=True)
    assert "".join(deltas) == "红楼梦是一部伟大" and detok.stop_string == "伟大"
    assert not any("\ufffd" in d for d in deltas)
