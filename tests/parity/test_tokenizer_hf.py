"""Our tokenizer (built from GGUF metadata) against HF transformers' on the same GGUF."""
from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")

from scaleinfer.tokenizer import Tokenizer  # noqa: E402
from scaleinfer.weights import gguf  # noqa: E402
from scaleinfer.weights.gguf_file import GGUFFile  # noqa: E402

TEXTS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph\twith a tab.",
    "北京是中华人民共和国的首都，也是全国的政治、文化中心。",
    "吾輩は猫である。名前はまだ無い。東京タワーとスカイツリー",
    "안녕하세요, 만나서 반갑습니다.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo:\n\tpass\n",
    "   leading spaces and trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed English 和中文 and émigré café naïve résumé",
    "if (x != 0) {\r\n\treturn x;\r\n}  \n\n\n    \t  ",
    "Ünïcödé: ÀÉÎÕÜ ßðþ Ωμέγα Привет мир مرحبا שלום नमस्ते",
    "don't won't I'll you've she'd WE'RE IT'S",
]
NUMBERS = ["Pi is 3.14159 and 2024 was a year; 1,000,000 items cost $42.50."]


def hf_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def catalog_pair(name: str):
    """(ours, HF's) tokenizers of an installed catalog model; skips when it is not installed."""
    from scaleinfer import catalog

    if not catalog.CATALOG[name].installed:
        pytest.skip(f"{name} is not installed (scaleinfer pull {name})")
    path = catalog.resolve(name)
    return gguf.read_tokenizer(GGUFFile.open(path)), hf_tokenizer(path)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    ours = Tokenizer.from_gguf_fields(gguf.tokenizer_fields(GGUFFile.open(smollm2_gguf_path)))
    return ours, hf_tokenizer(smollm2_gguf_path)


@pytest.mark.parametrize("text", TEXTS + NUMBERS)
def test_smollm2_ids_equal_hf(smollm2, text):
    ours, hf = smollm2
    assert ours.encode(text) == hf.encode(text, add_special_tokens=True)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_smollm2_splits_digits_like_the_original_tokenizer(smollm2):
    """SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) put every digit in its
    own token."""
    ours, _ = smollm2
    for text in NUMBERS:
        ids = ours.encode(text)
        pieces = [ours.token_text(i) for i in ids]
        assert all(len(p.strip()) <= 1 for p in pieces if any(c.isdigit() for c in p)), pieces
        assert ours.decode(ids) == text


def test_smollm2_chat_template_equals_hf(smollm2):
    ours, hf = smollm2
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "你好吗？"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_smollm2_end_of_turn_is_a_stop_token(smollm2):
    ours, _ = smollm2
    assert ours.encode("<|im_end|>", add_special_tokens=False)[0] in ours.eos_token_ids


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "你好吗？"}],
]


@pytest.fixture(scope="module")
def qwen25():
    return catalog_pair("qwen2.5-coder-0.5b-instruct")


@pytest.mark.parametrize("text", TEXTS + NUMBERS)
def test_qwen25_ids_equal_hf(qwen25, text):
    ours, hf = qwen25
    assert ours.encode(text) == hf.encode(text, add_special_tokens=True)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_qwen25_chat_template_equals_hf(qwen25):
    ours, hf = qwen25
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "description": "名字"}},
                                                   "required": ["city"]}}}]
    expected = hf.apply_chat_template(CONVERSATIONS[0], tools=tools, add_generation_prompt=True, tokenize=False)
    assert "get_weather" in expected
    assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == expected


def test_qwen25_stop_tokens(qwen25):
    ours, _ = qwen25
    im_end, end_of_text = ours.encode("<|im_end|><|endoftext|>", add_special_tokens=False)
    assert im_end in ours.eos_token_ids and end_of_text in ours.eos_token_ids
    assert ours.eos_token_id == im_end


# ---- Gemma 3: SentencePiece BPE from GGUF metadata ("llama" tokenizer model) ----------------------------
MULTILINGUAL = [
    "The committee will meet on Thursday to review the budget.",
    "北京是中国的首都，有着三千多年的建城史。",
    "東京は日本の首都です。カタカナ、ひらがな、漢字を使います。",
    "서울은 대한민국의 수도이며 한강이 흐릅니다.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "नई दिल्ली भारत की राजधानी है।",
    "Emoji: 🦀🦄🧠🫠 🏳️‍🌈 🤷🏽‍♀️ 👨‍👩‍👧‍👦",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "a  b   c    d\n\n\n\te\t\tf",
    "<table><tr><td>x</td></tr></table>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 ꙮ \x00\x01",  # rare characters: byte fallback
]


@pytest.fixture(scope="module")
def gemma3():
    return catalog_pair("gemma-3-270m")


@pytest.mark.parametrize("text", TEXTS + NUMBERS + MULTILINGUAL)
def test_gemma3_ids_equal_hf(gemma3, text):
    ours, hf = gemma3
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=True)
    assert ids[0] == ours.bos_token_id == 2
    assert ours.decode(ids[1:], skip_special_tokens=False) == hf.decode(ids[1:], skip_special_tokens=False) == text
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_gemma3_long_texts_equal_hf(gemma3):
    """Whole pages of the quality-gate texts (English, Chinese): SentencePiece BPE runs over the
    entire text at once (no pre-tokenizer split), so merge order errors would show here."""
    ours, hf = gemma3
    data = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
    texts = [open(os.path.join(data, name), encoding="utf-8").read()[:20000]
             for name in ("shakespeare-en.txt", "hongloumeng-zh.txt") if os.path.exists(os.path.join(data, name))]
    texts = texts or [" ".join(TEXTS + MULTILINGUAL) * 20]
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=True)


def test_gemma3_special_tokens(gemma3):
    ours, _ = gemma3
    start, end = ours.encode("<start_of_turn><end_of_turn>", add_special_tokens=False)
    assert (start, end) == (105, 106) and end in ours.eos_token_ids and 1 in ours.eos_token_ids
    assert ours.decode([2, start, end, 9259]) == ours.decode([9259])  # specials skipped when decoding
