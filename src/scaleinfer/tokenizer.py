"""Tokenizer (HF `tokenizers` + the model's Jinja chat template) and IncrementalDetokenizer.

Fed by the checkpoint readers (a tokenizer.json, or the vocabulary and merges inside a GGUF) and
used by the engine to encode prompts and to turn sampled ids into text deltas.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime

from scaleinfer.errors import RequestError, UnsupportedModelError, WeightLoadError

logger = logging.getLogger(__name__)

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre`, as the models' own tokenizers define them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    "gpt-2": [_GPT2_SPLIT], "default": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # SmolLM2: every digit alone, then GPT-2's split
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, backend, chat_template: str | None, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos_token: bool = False):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos_token = add_bos_token
        self.all_special_ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        eos = [eos_token_id] if eos_token_id is not None else []
        for end_of_turn in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
            tid = backend.token_to_id(end_of_turn)
            if tid is not None and chat_template and end_of_turn in chat_template and tid not in eos:
                eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 "
                                        f"(byte-level BPE)")
        tokens = list(fields["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        pre = fields.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE_SPLITS:
            logger.warning("unknown GGUF pre-tokenizer %r; using GPT-2's split", pre)
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _PRE_SPLITS.get(pre, [_GPT2_SPLIT])]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        types = list(fields.get("tokenizer.ggml.token_type") or [])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
        return cls(backend, fields.get("tokenizer.chat_template"), fields.get("tokenizer.ggml.bos_token_id"),
                   fields.get("tokenizer.ggml.eos_token_id"), bool(fields.get("tokenizer.ggml.add_bos_token")))

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise WeightLoadError(f"{path} has no tokenizer.json; only fast (tokenizers) tokenizers are supported")
        backend = Backend.from_file(tok_file)
        cfg = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        def token_id(name: str) -> int | None:
            tok = cfg.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return backend.token_to_id(tok) if tok else None

        return cls(backend, template, token_id("bos_token"), token_id("eos_token"), bool(cfg.get("add_bos_token")))

    # ---- text <-> ids --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """The text a single token stands for (for logprobs and /tokenize)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render messages with the model's Jinja template, the way HF transformers does."""
        if not self.chat_template:
            raise RequestError("this model has no chat template; send a plain prompt to /v1/completions "
                               "or `scaleinfer generate` instead")
        try:
            text = _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._token_str(self.bos_token_id), eos_token=self._token_str(self.eos_token_id),
                **kwargs)
        except _TemplateError as exc:
            raise RequestError(f"the chat template rejected the messages: {exc}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


class _TemplateError(Exception):
    pass


_TEMPLATES: dict[str, object] = {}


def _compile_template(source: str):
    if source not in _TEMPLATES:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise _TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas that never split a character.

    Each call decodes only a short window: the tokens since the last emitted boundary
    (prefix_offset..) compared with the same window without the new tokens; text ending in U+FFFD
    (an unfinished UTF-8 sequence) is held back until the next token completes it.
    Stop strings: text that could be the start of a stop string is held back too, so a stop string
    never reaches the caller, even when it spans tokens. `text` is everything released so far.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self._ids = list(prompt_token_ids[-6:])  # a little context so leading spaces decode right
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._decoded = ""    # all complete text decoded so far
        self._released = 0    # how much of it the caller has
        self._final: str | None = None
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        return self._final if self._final is not None else self._decoded[:self._released]

    def add_tokens(self, new_ids: list[int]) -> str:
        """Feed new token ids; returns the newly released text."""
        if self._final is not None:
            return ""
        self._ids.extend(new_ids)
        decode = self.tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = decode(self._ids[self._prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._decoded += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release()

    def _release(self) -> str:
        before = self._released
        text = self._decoded
        if self.stop:
            longest = max(len(s) for s in self.stop)
            search_from = max(0, before - longest + 1)
            hits = [(text.find(s, search_from), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.stop_string = s
                self._final = text[:i + len(s)] if self.include_stop else text[:i]
                return self._final[before:]
            hold = 0
            for s in self.stop:  # longest suffix of text that starts some stop string
                for k in range(min(len(s) - 1, len(text)), hold, -1):
                    if text.endswith(s[:k]):
                        hold = k
                        break
            self._released = max(before, len(text) - hold)
        else:
            self._released = len(text)
        return text[before:self._released]

    def flush(self) -> str:
        """The request ended without a stop string: release whatever was held back."""
        if self._final is not None:
            return ""
        before = self._released
        self._released = len(self._decoded)
        self._final = self._decoded
        return self._decoded[before:]
