"""Tokenizer: construction from GGUF fields, special tokens, BOS, end-of-turn ids, chat templates."""
from __future__ import annotations

import logging
from datetime import datetime

import pytest

from scaleinfer.errors import RequestError, UnsupportedModelError, WeightLoadError
from scaleinfer.tokenizer import Tokenizer


def test_smollm2_basics(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.eos_token_ids[0] == 2 and 2 in tok.all_special_ids and 0 in tok.all_special_ids
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens are matched whole, never split
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"] and tok.id_to_token(ids[1]) == "user"
    assert tok.decode(ids) == "user\nHello" and tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>")
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)  # SmolLM2 adds no BOS
    assert tok.token_text(tok.encode(" world")[0]) == " world"


def gguf_fields(**overrides) -> dict:
    tokens = ["<s>", "</s>", "<tool>"] + sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": [3, 3, 4] + [1] * (len(tokens) - 3), "tokenizer.ggml.merges": [],
              "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
              "tokenizer.ggml.add_bos_token": True}
    fields.update(overrides)
    return fields


def test_add_bos_and_user_defined_tokens():
    tok = Tokenizer.from_gguf_fields(gguf_fields())
    ids = tok.encode("a<tool>b")
    assert ids[0] == 0 and ids[2] == 2 and len(ids) == 4  # BOS, a, <tool> (whole), b
    assert 2 not in tok.all_special_ids and tok.decode(ids) == "a<tool>b"
    assert tok.encode("a", add_special_tokens=False) == ids[1:2]
    assert tok.encode("<s>a")[:2] == [0, ids[1]]  # no second BOS when the text starts with one


def test_llama3_adds_bos_unless_told_not_to():
    fields = gguf_fields()
    del fields["tokenizer.ggml.add_bos_token"]
    assert Tokenizer.from_gguf_fields(fields).encode("a")[0] == 0
    assert Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "gpt-2"}).encode("a")[0] != 0
    assert Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.add_bos_token": False}).encode("a")[0] != 0


def test_llama3_whole_words_skip_merges():
    base = gguf_fields()
    tokens = base["tokenizer.ggml.tokens"] + ["ab", "abc"]
    fields = {**base, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"],
              "tokenizer.ggml.token_type": base["tokenizer.ggml.token_type"] + [1, 1]}
    llama3 = Tokenizer.from_gguf_fields(fields)
    gpt2 = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "gpt-2"})
    assert llama3.convert_ids_to_tokens(llama3.encode("abc", add_special_tokens=False)) == ["abc"]
    assert gpt2.convert_ids_to_tokens(gpt2.encode("abc", add_special_tokens=False)) == ["ab", "c"]


def test_eot_ids_join_eos():
    tok = Tokenizer.from_gguf_fields(gguf_fields(**{"tokenizer.ggml.eot_token_id": 2}))
    assert tok.eos_token_ids == (1, 2)


def test_unknown_pre_tokenizer_warns_and_falls_back(caplog):
    with caplog.at_level(logging.WARNING, logger="scaleinfer.tokenizer"):
        tok = Tokenizer.from_gguf_fields(gguf_fields(**{"tokenizer.ggml.pre": "martian"}))
    assert "martian" in caplog.text and tok.decode(tok.encode("hi there")) == "hi there"


def test_unsupported_and_broken_gguf_tokenizers():
    with pytest.raises(UnsupportedModelError, match="'bert'.*gpt2"):
        Tokenizer.from_gguf_fields(gguf_fields(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(WeightLoadError, match="corrupt"):
        Tokenizer.from_gguf_fields(gguf_fields(**{"tokenizer.ggml.merges": ["x y"]}))


def template_tokenizer(template: str | None) -> Tokenizer:
    return Tokenizer.from_gguf_fields(gguf_fields(**({"tokenizer.chat_template": template} if template else {})))


def test_chat_template_environment():
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
                "{% endif %}{% generation %}[{{ m.role }}] {{ m.content }}{% endgeneration %}\n"
                "{% endfor %}{{ tools | tojson }}|{{ {'b': 'é', 'a': [1]} | tojson(sort_keys=True) }}|"
                "{{ strftime_now('%Y') }}|{{ eos_token }}{% if add_generation_prompt %}[assistant]{% endif %}")
    tok = template_tokenizer(template)
    messages = [{"role": "user", "content": "  hi  "}]
    text = tok.apply_chat_template(messages)
    year = datetime.now().strftime("%Y")
    # trim_blocks eats the newline after {% endgeneration %}, exactly as in HF transformers.
    assert text == f'<s>[user]   hi  null|{{"a": [1], "b": "é"}}|{year}|</s>[assistant]'
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("</s>")
    assert tok.apply_chat_template(messages, tools=[{"name": "f"}]).count('[{"name": "f"}]') == 1
    assert tok.apply_chat_template(messages, tokenize=True) == tok.encode(text, add_special_tokens=False)
    with pytest.raises(RequestError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_no_template_and_broken_template():
    with pytest.raises(RequestError, match="no chat template") as exc:
        template_tokenizer(None).apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(exc.value)
    with pytest.raises(RequestError, match="does not compile"):
        template_tokenizer("{% for m in messages %}").apply_chat_template([])


def test_template_is_sandboxed():
    tok = template_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
