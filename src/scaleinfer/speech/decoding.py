"""Whisper's special tokens and the per-step rules of one window's decoding, as a logits processor
(SamplingParams.logits_processors) that runs inside the engine's batched steps.

One decode of a 30 s window is one engine request. Its decoder prompt ends with <|startoftranscript|>;
the processor then forces the rest of the task sequence one step at a time, so that the logits at the
SOT position are seen (they give the no-speech probability and, when no language was given, the
language: the most likely language token, as openai-whisper's detect_language picks it):

    prompt:  [<|startofprev|> previous text ...] <|startoftranscript|>
    forced:  <|lang|> <|transcribe|> or <|translate|> [<|notimestamps|>]
    sampled: text and timestamp tokens ... <|endoftext|>

On the sampled steps it applies, as openai-whisper / CTranslate2 do: suppression of the non-speech
tokens (the model config's suppress_ids), of blank and <|endoftext|> as the first token, and the timestamp
rules (timestamps come in pairs, never decrease, the first token is a timestamp no later than
max_initial_timestamp; when timestamps are more likely together than any text token, one is taken).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scaleinfer.errors import RequestError

TIME_PRECISION = 0.02
"""Seconds per timestamp token step (<|0.00|>, <|0.02|> ...)."""


@dataclass(frozen=True)
class WhisperTokens:
    """The special token ids of a Whisper tokenizer and its languages."""

    sot: int
    eot: int
    sot_prev: int
    no_speech: int
    transcribe: int
    translate: int
    no_timestamps: int
    timestamp_begin: int
    languages: dict[str, int]              # "en" -> id of <|en|>, in the model's order
    suppress: tuple[int, ...]
    suppress_begin: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, lang_ids, suppress, suppress_begin) -> "WhisperTokens":
        def tid(text: str) -> int:
            i = tokenizer.backend.token_to_id(text)
            if i is None:
                raise RequestError(f"the tokenizer lacks {text}; is the model a Whisper model?")
            return i

        no_speech = tokenizer.backend.token_to_id("<|nospeech|>")
        if no_speech is None:
            no_speech = tid("<|nocaptions|>")   # the name in the first Whisper releases
        languages = {tokenizer.id_to_token(i)[2:-2]: i for i in lang_ids}
        no_timestamps = tid("<|notimestamps|>")
        # Timestamps follow <|notimestamps|> (tokenizer.json often leaves them out: <|0.00|> is the next id).
        return cls(tid("<|startoftranscript|>"), tid("<|endoftext|>"), tid("<|startofprev|>"), no_speech,
                   tid("<|transcribe|>"), tid("<|translate|>"), no_timestamps, no_timestamps + 1,
                   languages, tuple(suppress), tuple(suppress_begin))

    def language_id(self, language: str) -> int:
        if language not in self.languages:
            raise RequestError(f"unknown language {language!r}; use an ISO 639-1 code the model knows, e.g. "
                               f"{', '.join(list(self.languages)[:8])} ... ({len(self.languages)} in all)")
        return self.languages[language]


class WindowRules:
    """The logits processor of one window decode (see the module docstring); it also records what the
    SOT position said: no_speech_prob, and the language it chose when none was given."""

    def __init__(self, tokens: WhisperTokens, language: str | None, task: str, timestamps: bool,
                 max_initial_timestamp: float = 1.0):
        self.t = tokens
        self.language = language
        self.task_id = tokens.translate if task == "translate" else tokens.transcribe
        self.timestamps = timestamps
        self.max_initial_index = None if max_initial_timestamp is None else round(max_initial_timestamp / TIME_PRECISION)
        self.num_forced = 2 if timestamps else 3
        self.no_speech_prob: float | None = None
        self.language_prob: float | None = None
        self._suppress = torch.tensor(sorted(set(tokens.suppress)), dtype=torch.long)
        self._suppress_begin = torch.tensor(sorted(set(tokens.suppress_begin)), dtype=torch.long)
        self._lang_ids = torch.tensor(list(tokens.languages.values()), dtype=torch.long)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_ids)
        if step == 0:
            self._read_sot(logits)
            return _force(logits, self.t.language_id(self.language))
        if step < self.num_forced:
            return _force(logits, self.task_id if step == 1 else self.t.no_timestamps)
        logits[self._suppress.to(logits.device)] = -math.inf
        seq = output_ids[self.num_forced:]
        if not seq:
            logits[self._suppress_begin.to(logits.device)] = -math.inf
        if self.timestamps:
            self._timestamp_rules(seq, logits)
        return logits

    def _read_sot(self, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=-1)
        self.no_speech_prob = float(probs[self.t.no_speech])
        if self.language is None:
            lang_probs = probs[self._lang_ids.to(probs.device)]
            best = int(lang_probs.argmax())
            self.language = list(self.t.languages)[best]
            self.language_prob = float(lang_probs[best] / lang_probs.sum())

    def _timestamp_rules(self, seq: list[int], logits: torch.Tensor) -> None:
        tb, eot = self.t.timestamp_begin, self.t.eot
        logits[self.t.no_timestamps] = -math.inf
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penultimate_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penultimate_ts:   # a pair just closed: text next (or the end)
                logits[tb:] = -math.inf
            else:                # a lone timestamp: another one or the end, not text
                logits[:eot] = -math.inf
        stamps = [t for t in seq if t >= tb]
        if stamps:   # never decreasing; a closing one may repeat the opening one
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            logits[tb:floor] = -math.inf
        if not seq:
            logits[:tb] = -math.inf
            if self.max_initial_index is not None:
                logits[tb + self.max_initial_index + 1:] = -math.inf
        # Timestamps together more likely than the best text token? (The softmax normalizer cancels.)
        if logits[tb:].float().logsumexp(dim=-1) > logits[:tb].max():
            logits[:tb] = -math.inf


def _force(logits: torch.Tensor, token: int) -> torch.Tensor:
    logits.fill_(-math.inf)
    logits[token] = 0.0
    return logits
