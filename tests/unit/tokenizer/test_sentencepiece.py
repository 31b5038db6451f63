"""SentencePiece BPE from GGUF-style metadata on a hand-made vocabulary (no model files needed)."""
from __future__ import annotations

from scaleinfer.tokenizer import IncrementalDetokenizer, Tokenizer, _merges_from_vocab

SPACE = "\u2581"
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def spm_fields(**extra) -> dict:
    # specials, bytes, then pieces in merge order (Gemma ranks merges by vocabulary position)
    pieces = ["h", "e", "l", "o", SPACE, "w", "r", "d", "ll", "he", "hell", "hello", SPACE + "w", "or",
              SPACE + "wor", "ld", SPACE + "world", "好"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "  "] + BYTES + pieces
    types = [3, 3, 3, 3, 3, 4] + [6] * 256 + [1] * len(pieces)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [0.0] * len(tokens),
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0, **extra}


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))


def test_words_merge_in_vocabulary_order_and_spaces_are_visible():
    tok = Tokenizer.from_gguf_fields(spm_fields(), "gemma")
    assert pieces(tok, "hello world") == ["hello", SPACE + "world"]
    assert tok.encode("hello")[0] == 2  # BOS: a SentencePiece vocabulary adds it by default
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_unknown_characters_fall_back_to_bytes_and_decode_whole():
    tok = Tokenizer.from_gguf_fields(spm_fields(), "gemma")
    text = "he😀好"
    assert pieces(tok, text) == ["he", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "好"]
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    streamed = [detok.add_tokens([i]) for i in ids]
    assert "".join(streamed) + detok.flush() == text
    assert "\ufffd" not in "".join(streamed)  # the emoji appears once, whole


def test_gemma_space_runs_are_respelled_and_control_tokens_stay_whole():
    tok = Tokenizer.from_gguf_fields(spm_fields(), "gemma")
    # "  " (stored with real spaces, 6th in the vocabulary) is the piece "\u2581\u2581" and merges first
    assert pieces(tok, "hello  world") == ["hello", SPACE * 2, "w", "or", "ld"]
    assert tok.decode(tok.encode("hello  world")) == "hello  world"
    assert tok.encode("<start_of_turn>hello", add_special_tokens=False)[0] == 4


def test_llama2_style_vocabulary_prepends_a_space():
    tok = Tokenizer.from_gguf_fields(spm_fields(**{"tokenizer.ggml.add_space_prefix": True}), "llama")
    assert pieces(tok, "world") == [SPACE + "world"]
    assert tok.decode(tok.encode("world")) == "world"


def test_merges_from_vocabulary_rank_by_priority_then_longer_left_part():
    vocab = ["a", "b", "c", "ab", "bc", "abc"]
    ids = {t: i for i, t in enumerate(vocab)}
    merges = _merges_from_vocab(vocab, ids, [-i for i in range(len(vocab))])
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
