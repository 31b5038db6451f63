"""Tokenizer (HF `tokenizers` + the model's Jinja chat template) and IncrementalDetokenizer.

Fed by the checkpoint readers (a tokenizer.json, or the vocabulary and merges inside a GGUF) and
used by the engine to encode prompts and to turn sampled ids into text deltas. Pure Python: no torch.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime

from scaleinfer.errors import RequestError, UnsupportedModelError, WeightLoadError
from scaleinfer.tokenizer.gguf_vocab import (PRE_TOKENIZER_SPLITS, _LLAMA3_NAMES, _byte_level_backend,  # noqa: F401
                                             _merges_from_vocab, _sentencepiece_backend)

logger = logging.getLogger(__name__)

SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>")


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and the ids that end a turn."""

    def __init__(self, backend, chat_template: str | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, add_bos_token: bool = False,
                 extra_eos_token_ids: Sequence[int] = (), special_tokens: Mapping[str, str] | None = None):
        self.backend = backend
        """The `tokenizers.Tokenizer` doing the work."""
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v}
        for name, token_id in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            if token_id is not None and name not in self._special_tokens:
                self._special_tokens[name] = backend.id_to_token(token_id) or ""
        eos = [eos_token_id] if eos_token_id is not None else []
        eos += [int(i) for i in extra_eos_token_ids]
        for end_of_turn in _END_OF_TURN:  # as llama.cpp's end-of-generation set: these end a reply too
            token_id = backend.token_to_id(end_of_turn)
            if token_id is not None and token_id in self._special_ids:
                eos.append(token_id)
        self._eos_token_ids = tuple(dict.fromkeys(eos))
        self._template = None
        self._max_token_chars: int | None = None

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: Mapping, spelling: str = "llama") -> "Tokenizer":
        """The tokenizer a GGUF's tokenizer.* metadata describes (see weights.gguf.tokenizer_fields):
        byte-level BPE ("gpt2": Llama 3, SmolLM2, Qwen2) or SentencePiece BPE ("llama": Gemma, Llama 2,
        Mistral). `spelling` says how a SentencePiece vocabulary is written: "llama" or "gemma" (the model
        family's tokenizer_kind, models/registry.py; see _sentencepiece_backend)."""
        from tokenizers import AddedToken

        kind = fields.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_GGUF_TOKENIZERS:
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level "
                                        f"BPE: Llama 3, SmolLM2, Qwen2), llama (SentencePiece BPE: Gemma, Llama 2, "
                                        f"Mistral)")
        tokens = list(fields.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise WeightLoadError("the GGUF has no tokenizer.ggml.tokens; the file is incomplete")
        pre = fields.get("tokenizer.ggml.pre") or "default"
        try:
            if kind == "gpt2":
                backend, vocab = _byte_level_backend(fields, tokens, pre), tokens
            else:
                backend, vocab = _sentencepiece_backend(fields, tokens, spelling == "gemma")
        except Exception as exc:  # the Rust side raises a plain Exception, e.g. a merge of unknown tokens
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise WeightLoadError(f"cannot build the tokenizer from the GGUF metadata ({first}); the file is "
                                  f"corrupt") from None
        # Control and user-defined tokens are matched whole in the text, never split (as llama.cpp does).
        # A user-defined token the vocabulary respelled (Gemma's runs of spaces) is left to the model.
        types = list(fields.get("tokenizer.ggml.token_type") or [])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, v, ty in zip(tokens, vocab, types) if ty == _USER_DEFINED and t == v])

        def token(key: str) -> str | None:
            token_id = fields.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        # llama.cpp adds BOS to a SentencePiece vocabulary (and Llama 3's) unless the file says otherwise.
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama" or pre in _LLAMA3_NAMES))
        extra_eos = [fields[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in fields]
        return cls(backend, fields.get("tokenizer.chat_template"), fields.get("tokenizer.ggml.bos_token_id"),
                   fields.get("tokenizer.ggml.eos_token_id"), add_bos,
                   extra_eos, {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")})

    @classmethod
    def from_hf_dir(cls, path: str, extra_eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """From an HF model directory: tokenizer.json, tokenizer_config.json (template, bos/eos, add_bos),
        chat_template.jinja and generation_config.json (extra eos ids) when present. Without a
        tokenizer.json: a Marian SentencePiece tokenizer (spm.MarianSpmTokenizer), T5's spiece.model, or
        BART / RoBERTa's vocab.json + merges.txt (bpe_files.py)."""
        from tokenizers import Tokenizer as Backend

        from scaleinfer.tokenizer import bpe_files, spm

        tok_file = os.path.join(path, "tokenizer.json")
        cfg = _read_json_if_present(os.path.join(path, "tokenizer_config.json"))
        if os.path.isfile(tok_file):
            try:
                backend = Backend.from_file(tok_file)
            except Exception as exc:  # the Rust side raises a plain Exception on bad JSON
                raise WeightLoadError(f"cannot read {tok_file} ({exc}); re-download the model") from None
        elif spm.is_marian_dir(path):  # opus-mt: source.spm / target.spm / vocab.json
            return spm.MarianSpmTokenizer(path, cfg, extra_eos_token_ids)
        elif spm.is_spiece_dir(path):  # T5: spiece.model only
            backend = spm.t5_backend(path, cfg)
        elif bpe_files.is_bpe_dir(path):  # BART / RoBERTa: vocab.json + merges.txt
            backend = bpe_files.byte_bpe_backend(path, cfg)
        else:
            raise WeightLoadError(f"{path} has no tokenizer.json (nor spiece.model, source.spm + vocab.json, or "
                                  f"vocab.json + merges.txt); save one with "
                                  f"AutoTokenizer.from_pretrained(...).save_pretrained()")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        def token_str(name: str) -> str | None:
            tok = cfg.get(name)
            return tok.get("content") if isinstance(tok, dict) else tok

        def token_id(name: str) -> int | None:
            tok = token_str(name)
            return backend.token_to_id(tok) if tok else None

        gen_eos = _read_json_if_present(os.path.join(path, "generation_config.json")).get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        specials = {name: token_str(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(backend, template, token_id("bos_token"), token_id("eos_token"), bool(cfg.get("add_bos_token")),
                   [*extra_eos_token_ids, *gen_eos], specials)

    # ---- properties ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, the checkpoint's extra ones (GGUF eot/eom, generation_config.json),
        then the special end-of-turn / end-of-text tokens of the vocabulary (<|im_end|>, <|endoftext|>, ...)."""
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def max_token_chars(self) -> int:
        """Most characters one token can stand for (its longest vocabulary spelling, which has a
        character per byte or more): a text of c characters has at least c / max_token_chars tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(1, max(map(len, self.backend.get_vocab(with_added_tokens=True))))
        return self._max_token_chars

    # ---- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS is prepended when the model asks for it.

        encode_batch, not encode: the same ids, but it releases the GIL while it works (a long prompt
        tokenized on a server's worker thread must not freeze its event loop); ~2 us more per call."""
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and self._bos_token_id is not None:
            if not ids or ids[0] != self._bos_token_id:
                ids = [self._bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (byte-level spelling, e.g. "Ġthe"), None if out of range."""
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """The text a single token stands for (for logprobs and /tokenize)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render messages with the model's Jinja template, as HF transformers' apply_chat_template does.

        Extra keyword arguments (tools, documents, enable_thinking, ...) are passed to the template."""
        if not self.chat_template:
            raise RequestError("this model has no chat template; send a plain prompt (/v1/completions, "
                               "`scaleinfer generate`) or use a chat model")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {**self._special_tokens, "tools": None, "documents": None, **_plain(kwargs)}
        try:
            text = self._template.render(messages=_plain(list(messages)), add_generation_prompt=add_generation_prompt,
                                         **variables)
        except Exception as exc:  # raise_exception(), or the template tripping over unexpected messages
            raise RequestError(f"the chat template rejected the messages: {exc}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _read_json_if_present(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read {path} ({exc}); re-download the model") from None


def _plain(value):
    """Messages and template arguments as plain JSON-like data (pydantic models and dataclasses dumped)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):  # pydantic message objects from the server
        return _plain(value.model_dump(exclude_none=True))
    return value


def _compile_template(source: str):
    """A Jinja template in the environment HF transformers renders chat templates in."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (HF marks assistant spans with it): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise RequestError(f"the model's chat template does not compile (line {exc.lineno}: {exc.message}); "
                           f"send a plain prompt instead") from None


from scaleinfer.tokenizer.detokenizer import IncrementalDetokenizer  # noqa: E402,F401  (re-exported)
