"""Tokenizers of HF directories that ship SentencePiece models instead of a tokenizer.json.

- Marian (opus-mt: source.spm, target.spm, vocab.json): MarianSpmTokenizer, HF's slow MarianTokenizer
  reproduced with the `sentencepiece` package: the source model cuts the input into pieces, the shared
  vocab.json numbers them (unknown pieces -> <unk>), a leading `>>xxx<<` target-language token is kept
  whole, special tokens in the text are matched whole, `</s>` is appended. Decoding skips special ids
  and joins pieces with the source model (the target model and target_vocab.json with separate_vocabs),
  as HF's `convert_tokens_to_string` does.
- T5 with only spiece.model: t5_backend, the `tokenizers` Unigram model HF's T5Tokenizer builds from it
  (pieces and scores, the precompiled normalizer, <extra_id_N> sentinels after the pieces).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from scaleinfer.errors import RequestError, WeightLoadError

_SPACE = "\u2581"


def _import_sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise WeightLoadError("this model's tokenizer is a SentencePiece model: pip install sentencepiece") from None
    return sentencepiece


def _load_spm(path: str):
    sp = _import_sentencepiece().SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as exc:
        raise WeightLoadError(f"cannot read the SentencePiece model {path} ({exc}); re-download the model") from None
    return sp


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read {path} ({exc}); re-download the model") from None


def is_marian_dir(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("source.spm", "vocab.json"))


def is_spiece_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "spiece.model"))


class MarianSpmTokenizer:
    """HF MarianTokenizer's ids and texts, with the engine's Tokenizer interface (see tokenizer/__init__)."""

    chat_template = None
    add_bos_token = False
    backend = None

    FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json")

    def __init__(self, path: str, cfg: dict, extra_eos_token_ids: Sequence[int] = ()):
        self.path = path
        def name(key: str, default: str) -> str:
            tok = cfg.get(key, default)
            return tok.get("content") if isinstance(tok, dict) else (tok or default)

        self.unk_token, self.eos_token, self.pad_token = (name("unk_token", "<unk>"), name("eos_token", "</s>"),
                                                          name("pad_token", "<pad>"))
        self.encoder: dict[str, int] = _read_json(os.path.join(path, "vocab.json"))
        if self.unk_token not in self.encoder:
            raise WeightLoadError(f"{path}/vocab.json has no {self.unk_token!r} token; the file is corrupt")
        self.separate_vocabs = bool(cfg.get("separate_vocabs", False))
        decoder_vocab = self.encoder
        if self.separate_vocabs:
            decoder_vocab = _read_json(os.path.join(path, "target_vocab.json"))
        self.decoder = {int(v): k for k, v in decoder_vocab.items()}
        self.spm_source = _load_spm(os.path.join(path, "source.spm"))
        target = os.path.join(path, "target.spm")
        self.spm_target = _load_spm(target) if os.path.isfile(target) else self.spm_source
        self.language_codes = [k for k in self.encoder if k.startswith(">>") and k.endswith("<<")]
        """Target-language tokens of a multilingual model (begin the input with one: ">>cmn_Hans<< Hello")."""
        specials = [self.eos_token, self.unk_token, self.pad_token]
        for token_id, tok in (cfg.get("added_tokens_decoder") or {}).items():
            if tok.get("special") and tok.get("content") not in specials:
                specials.append(tok["content"])
        specials += [t for t in cfg.get("additional_special_tokens") or [] if isinstance(t, str) and t not in specials]
        self._special_tokens = {t: self.encoder.get(t, self.encoder[self.unk_token]) for t in specials}
        self._special_ids = frozenset(self._special_tokens.values())
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")
        self._eos_token_id = self.encoder.get(self.eos_token)
        eos = [self._eos_token_id] if self._eos_token_id is not None else []
        self._eos_token_ids = tuple(dict.fromkeys([*eos, *map(int, extra_eos_token_ids)]))
        self._max_token_chars = max(1, max(map(len, self.encoder)))

    # ---- the Tokenizer interface -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def bos_token_id(self) -> int | None:
        return None

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def max_token_chars(self) -> int:
        return self._max_token_chars

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text` (HF's tokenize): special tokens whole, each chunk between them through the
        source model, a `>>xxx<<` at a chunk's start kept as one token."""
        pieces: list[str] = []
        for chunk in self._split.split(text):
            if chunk in self._special_tokens:
                pieces.append(chunk)
            elif chunk:
                if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:
                    pieces.append(chunk[:end + 2])
                    chunk = chunk[end + 2:]
                pieces += self.spm_source.encode(chunk, out_type=str)
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        unk = self.encoder[self.unk_token]
        ids = [self.encoder.get(p, unk) for p in self.tokenize(text)]
        if add_special_tokens and self._eos_token_id is not None:
            ids.append(self._eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        tokens = [self._token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self._special_ids)]
        sp = self.spm_target if self.separate_vocabs else self.spm_source   # as HF's default use_source_tokenizer
        out, run = "", []
        for tok in tokens:
            if tok in self._special_tokens:
                out += sp.decode_pieces(run) + tok + " "
                run = []
            else:
                run.append(tok)
        out += sp.decode_pieces(run)
        return out.replace(_SPACE, " ").strip()

    def _token(self, token_id: int) -> str:
        tok = self.decoder.get(token_id)
        if tok is None:
            sp = self.spm_target if self.separate_vocabs else self.spm_source
            tok = sp.IdToPiece(token_id) if 0 <= token_id < sp.GetPieceSize() else ""
        return tok or self.unk_token

    def id_to_token(self, token_id: int) -> str | None:
        return self.decoder.get(token_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.decoder.get(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def save_files(self, output: str) -> None:
        """Copy the tokenizer's files into `output` (a `scaleinfer quantize` directory)."""
        import shutil

        for name in self.FILES:
            if os.path.isfile(os.path.join(self.path, name)):
                shutil.copyfile(os.path.join(self.path, name), os.path.join(output, name))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        raise RequestError("this model has no chat template; send a plain prompt")


def _precompiled_charsmap(model_file: str) -> bytes | None:
    """ModelProto.normalizer_spec.precompiled_charsmap of a SentencePiece model, read from the protobuf
    wire format (field 3, then field 2), so no protobuf package is needed."""
    with open(model_file, "rb") as f:
        data = f.read()

    def fields(buf: bytes):
        pos = 0
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            number, kind = key >> 3, key & 7
            if kind == 0:
                _, pos = _varint(buf, pos)
                yield number, None
            elif kind == 1:
                pos += 8
            elif kind == 5:
                pos += 4
            elif kind == 2:
                size, pos = _varint(buf, pos)
                yield number, buf[pos:pos + size]
                pos += size
            else:
                raise WeightLoadError(f"{model_file} is not a SentencePiece model (protobuf wire type {kind})")

    for number, value in fields(data):
        if number == 3 and value is not None:
            for inner, charsmap in fields(value):
                if inner == 2 and charsmap:
                    return charsmap
    return None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise WeightLoadError("truncated SentencePiece model file; re-download the model")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def t5_backend(path: str, cfg: dict):
    """The `tokenizers.Tokenizer` HF's T5Tokenizer builds from spiece.model: a Unigram model over the
    pieces and scores, <extra_id_N> sentinels (tokenizer_config's extra_ids, default 100) numbered after
    the pieces from the highest N down, whitespace split + Metaspace, `</s>` appended."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    model_file = os.path.join(path, "spiece.model")
    sp = _load_spm(model_file)
    vocab = [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())]
    backend = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    charsmap = _precompiled_charsmap(model_file)
    if charsmap:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    extra = [t for t in cfg.get("additional_special_tokens") or [] if isinstance(t, str) and "<extra_id_" in t]
    if not extra:
        extra = [f"<extra_id_{i}>" for i in range(int(cfg.get("extra_ids", 100)))]
    specials = [cfg_token(cfg, "pad_token", "<pad>"), cfg_token(cfg, "eos_token", "</s>"),
                cfg_token(cfg, "unk_token", "<unk>")]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reversed(extra)])
    eos = specials[1]
    backend.post_processor = processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B", eos],
                                                           special_tokens=[(eos, backend.token_to_id(eos))])
    return backend


def cfg_token(cfg: dict, key: str, default: str) -> str:
    tok = cfg.get(key, default)
    return (tok.get("content") if isinstance(tok, dict) else tok) or default
