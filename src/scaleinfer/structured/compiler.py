"""GrammarCompiler: StructuredOutputsParams -> an xgrammar CompiledGrammar for one model's vocabulary.

The vocabulary is handed to xgrammar from our Tokenizer (HF `tokenizers` backend), its encoding
(byte-level BPE or SentencePiece byte fallback) read from the vocabulary itself. Compiled grammars are
cached by their canonical spec, so a schema sent by every request is compiled once. Anything xgrammar
refuses (malformed JSON, an unsupported or contradictory schema, a bad regex or EBNF) becomes a
RequestError naming the field; so do contradictions xgrammar lets through (structured/schema_check.py),
a grammar whose first step allows no token at all, and a grammar with a rule that can never finish
(structured/grammar_check.py: no finite output, e.g. `root ::= "a" root`, or a trap the model could enter
and then write until max_tokens).
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

from scaleinfer.errors import RequestError
from scaleinfer.sampling_params import StructuredOutputsParams
from scaleinfer.structured.grammar_check import unproductive_rules
from scaleinfer.structured.schema_check import schema_problem

logger = logging.getLogger(__name__)

CACHE_SIZE = 256
"""Compiled grammars kept (least recently used dropped first)."""


def tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's TokenizerInfo for our Tokenizer and the model's logits width (`vocab_size`, which may
    exceed the tokenizer's: padding rows that no text maps to)."""
    import xgrammar as xgr

    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, index in vocab.items():
        if index < vocab_size:
            encoded[index] = token
    if sum(f"<0x{b:02X}>" in vocab for b in range(256)) >= 128:   # SentencePiece with byte fallback
        kind, space = xgr.VocabType.BYTE_FALLBACK, "\u2581"
    elif "Ġ" in vocab or "Ċ" in vocab:                                # GPT-2 byte-level BPE
        kind, space = xgr.VocabType.BYTE_LEVEL, "Ġ"
    else:
        kind, space = xgr.VocabType.RAW, None
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False)[:1])
    add_prefix_space = bool(space and first and first[0] and first[0].startswith(space))
    stops = [t for t in tokenizer.eos_token_ids if t < vocab_size]
    return xgr.TokenizerInfo(encoded, kind, vocab_size=vocab_size, stop_token_ids=stops or None,
                             add_prefix_space=add_prefix_space)


def spec_key(spec: StructuredOutputsParams) -> str:
    """A canonical text per distinct grammar (key order of a schema does not matter)."""
    value = getattr(spec, spec.kind)
    if spec.kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass   # compile() reports it
    return json.dumps([spec.kind, value, spec.any_whitespace], sort_keys=True, ensure_ascii=False)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the given strings."""
    def literal(text: str) -> str:
        out = []
        for ch in text:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\x{ord(ch):02x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    return "root ::= " + " | ".join(literal(c) for c in dict.fromkeys(choices))


class GrammarCompiler:
    """Compiles (and caches) the grammars of one model; thread-safe (the server validates on its threads)."""

    def __init__(self, tokenizer, vocab_size: int, max_threads: int = 2):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.stop_token_ids = list(self.info.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams):
        """The CompiledGrammar of `spec` (cached); RequestError if it is invalid or allows no output."""
        key = spec_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        self._check_satisfiable(spec, compiled)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams):
        kind, value = spec.kind, getattr(spec, spec.kind)
        try:
            if kind == "json":
                schema = value if isinstance(value, str) else json.dumps(value)
                problem = schema_problem(json.loads(schema))   # contradictions xgrammar lets through
                if problem is not None:
                    raise RequestError(f"invalid structured output JSON schema: {problem}")
                return self._compiler.compile_json_schema(schema, any_whitespace=spec.any_whitespace)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=spec.any_whitespace,
                                                          strict_mode=False)
            if kind == "regex":
                return self._compiler.compile_regex(value)
            if kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(value))
            return self._compiler.compile_grammar(value)
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError with its reason
            raise RequestError(f"invalid structured output {_NAMES[kind]}: {_reason(exc)}") from None

    def _check_satisfiable(self, spec: StructuredOutputsParams, compiled) -> None:
        """Refuse a grammar that allows no first token (e.g. an empty language) or has a rule that can
        never finish (no finite derivation: the model would write until max_tokens)."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        if not bool(bitmask.any()):
            raise RequestError(f"the structured output {_NAMES[spec.kind]} cannot be satisfied: no token can "
                               f"start it; check it for contradictions")
        endless = unproductive_rules(str(compiled.grammar))
        if endless:
            raise RequestError(_endless_message(spec.kind, endless))


_NAMES = {"json": "JSON schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
          "grammar": "grammar (EBNF)"}


def _endless_message(kind: str, rules: list[str]) -> str:
    """One line for a grammar with rules that can never finish (root first when it is one of them)."""
    if kind == "json":
        what = ("has no finite instance" if rules[0] == "root" else "has a part with no finite instance")
        return (f"the structured output JSON schema {what}: it requires a value of its own type recursively "
                f"with no way to stop (make the recursive property optional, or allow an empty array / null)")
    if rules[0] == "root":
        return (f"the structured output {_NAMES[kind]} has no finite output: rule 'root' can never finish "
                f"(every alternative recurses); give a rule a terminating alternative")
    return (f"the structured output {_NAMES[kind]} can run forever: rule '{rules[0]}' (reachable from root) "
            f"can never finish (every alternative recurses); give it a terminating alternative")


def _reason(exc: Exception) -> str:
    """xgrammar's message without its source location ("[12:00:00] /project/cpp/x.cc:12: why")."""
    text = " ".join(str(exc).split())
    if "] /" in text and ": " in text:
        text = text.split("] ", 1)[1]
        parts = text.split(": ", 1)
        text = parts[1] if len(parts) == 2 and ".cc:" in parts[0] else text
    return text[:500] or type(exc).__name__
