"""The `tokenizers` backends a GGUF's vocabulary describes (Tokenizer.from_gguf_fields): byte-level BPE
split by the model's pre-tokenizer regexes, and SentencePiece BPE with merges recovered from the vocabulary."""
from __future__ import annotations

import logging
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# Pre-tokenizer split patterns, by GGUF `tokenizer.ggml.pre` (llama.cpp's LLAMA_VOCAB_PRE_TYPE_* names).
# Each is the split the model's own tokenizer.json applies before byte-level BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"  # numbers in threes
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"  # one digit per piece
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = [r"\p{N}", _GPT2_SPLIT]  # every digit alone, then GPT-2's split (StarCoder's vocabulary)
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "gpt-2": [_GPT2_SPLIT], "mpt": [_GPT2_SPLIT], "olmo": [_GPT2_SPLIT],
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "dbrx": [_LLAMA3_SPLIT], "smaug-bpe": [_LLAMA3_SPLIT], "falcon3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT], "megrez": [_QWEN2_SPLIT],
}
"""GGUF pre-tokenizer name -> regexes applied in turn (pieces are split further by each)."""
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3")
"""llama.cpp's LLAMA3 pre-type: a piece found whole in the vocabulary skips BPE (ignore_merges, as in
Llama 3's tokenizer.json), and BOS is added unless the file says otherwise."""


def _byte_level_backend(fields: Mapping, tokens: list[str], pre: str):
    """GPT-2 style BPE over bytes spelled as characters, split first by the model's pre-tokenizer regexes."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                 ignore_merges=pre in _LLAMA3_NAMES))
    if pre not in PRE_TOKENIZER_SPLITS:
        logger.warning("unknown GGUF pre-tokenizer %r; splitting text like GPT-2 (known: %s)", pre,
                       ", ".join(PRE_TOKENIZER_SPLITS))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in PRE_TOKENIZER_SPLITS.get(pre, [_GPT2_SPLIT])]
    backend.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                       use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_backend(fields: Mapping, tokens: list[str], gemma: bool):
    """SentencePiece BPE from a GGUF vocabulary: spaces become "\u2581", text outside the vocabulary
    falls back to <0xNN> byte tokens, and merges (absent from such files) are recovered from the
    vocabulary. Returns the backend and the vocabulary as the backend spells it.

    Gemma files differ from Llama 2's in three ways, all matched to HF transformers' reading of the same
    file: no space is prepended to the text; tokens made only of spaces are stored with real spaces
    where the model's pieces use "\u2581"; and the merge order is the order of the vocabulary, not the
    scores (which are equal for many of its tokens)."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    if gemma:
        vocab = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = [-i for i in range(len(vocab))]
    else:
        vocab = tokens
        scores = fields.get("tokenizer.ggml.scores")
        priority = list(scores) if scores is not None else [-i for i in range(len(vocab))]
    ids = {t: i for i, t in enumerate(vocab)}
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []] or \
        _merges_from_vocab(vocab, ids, priority)
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(models.BPE(vocab=ids, merges=merges, byte_fallback=True, fuse_unk=True, dropout=None,
                                 unk_token=vocab[unk] if unk is not None and 0 <= unk < len(vocab) else None))
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", not gemma))
    if add_prefix:  # Llama 2: "Hello" is spelled "\u2581Hello"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
    else:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
        backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, vocab


def _merges_from_vocab(vocab: list[str], ids: dict[str, int], priority: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every way to cut a token into two tokens of the
    vocabulary is a merge, ranked by the priority of the token it makes (higher first); cuts of one token
    rank longer left parts first."""
    ranked = []
    for index, token in enumerate(vocab):
        if ids.get(token) != index:  # a duplicate spelling: the last one wins, as in the vocabulary dict
            continue
        cuts = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        cuts.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        ranked.extend((priority[index], len(left), len(right), left, right) for left, right in cuts)
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)  # stable: ties keep vocabulary order
    return [(m[3], m[4]) for m in ranked]
