"""A made-up WordLevel tokenizer ("t0" .. "t{N-1}") for the self-contained GPU tests: a GPU machine holds none
of the catalog's models, so they write random-weight HF directories with this tokenizer beside the weights."""
from __future__ import annotations

import json


def write_wordlevel_tokenizer(path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json in `path`: word i is "t{i}", bos "t1", eos "t2", unknown "t0"."""
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab_size)}, "unk_token": "t0"}}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t1", "eos_token": "t2"}))
