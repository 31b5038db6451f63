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
        chat_template.jinja and generation_config.json (extra eos ids) when present."""
        from tokenizers import Tokenizer as Backend

        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise WeightLoadError(f"{path} has no tokenizer.json; only fast (HF `tokenizers`) tokenizers are "
                                  f"supported: save one with AutoTokenizer.from_pretrained(...).save_pretrained()")
        try:
            backend = Backend.from_file(tok_file)
        except Exception as exc:  # the Rust side raises a plain Exception on bad JSON
            raise WeightLoadError(f"cannot read {tok_file} ({exc}); re-download the model") from None
        cfg = _read_json_if_present(os.path.join(path, "tokenizer_config.json"))
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


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas that never split a character or leak a stop string.

    Decoding (as TGI and vLLM do): each call decodes only a short window, the tokens from
    `prefix_offset` on, and compares it with the same window without the new tokens; the difference is
    the new text. While that text ends in U+FFFD (an unfinished UTF-8 sequence: a CJK character or
    emoji split across byte tokens) nothing moves, so the next token completes it and it appears once.

    Stop strings: new text joins `pending`, the part not yet released. A stop string found there ends
    the request (cut before it, or after it with include_stop_str_in_output). Otherwise the longest
    suffix of `pending` that could begin a stop string is held back and the rest released; text before
    that point can never become part of a stop string, so nothing released is ever taken back.
    Work per call is O(window + longest stop string), independent of the output length.
    """

    _PROMPT_CONTEXT = 6
    """Prompt tokens decoded along with the first outputs, so a leading space decodes as in the full text."""
    _MAX_UNFINISHED = 16
    """Tokens to wait for an unfinished character before giving up and releasing U+FFFD (garbage output)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_string: str | None = None
        """The stop string that ended the output, or None."""
        self._ids = list(prompt_token_ids[-self._PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._released: list[str] = []
        self._pending = ""
        self._finished = False

    @property
    def text(self) -> str:
        """All text released so far (the full output once finished, without a stop string unless asked)."""
        if len(self._released) != 1:  # join lazily: add_tokens stays O(new text)
            self._released = ["".join(self._released)]
        return self._released[0]

    @property
    def finished(self) -> bool:
        """A stop string was found or flush() was called; further tokens are ignored."""
        return self._finished

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Feed new token ids; returns the newly releasable text (often "", never a partial character)."""
        if self._finished or not new_ids:
            return ""
        self._ids.extend(new_ids)
        new_text = self._decode_new()
        return self._release(new_text) if new_text else ""

    def flush(self) -> str:
        """The request ended without a stop string: release whatever was held back."""
        if self._finished:
            return ""
        self._finished = True
        delta, self._pending = self._pending, ""
        self._released.append(delta)
        return delta

    def _decode_new(self) -> str:
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        full = decode(self._ids[self._prefix_offset:], skip)
        if full.endswith("\ufffd") and len(self._ids) - self._read_offset < self._MAX_UNFINISHED:
            return ""  # an unfinished character: wait for the token that completes it
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _release(self, new_text: str) -> str:
        if not self.stop:
            self._released.append(new_text)
            return new_text
        pending = self._pending + new_text
        hits = [(pending.find(s), n, s) for n, s in enumerate(self.stop)]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            start, _, stop = min(hits)  # earliest in the text; ties go to the first listed
            end = start + len(stop) if self.include_stop_str_in_output else start
            self.stop_string, self._finished, self._pending = stop, True, ""
            self._released.append(pending[:end])
            return pending[:end]
        hold = 0
        for s in self.stop:  # longest suffix of pending that starts some stop string
            for k in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:k]):
                    hold = k
                    break
        delta, self._pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
        self._released.append(delta)
        return delta
