"""SamplingParams: how one request picks its tokens and when it stops. Validated on construction.

Names and semantics follow vLLM (and through it the OpenAI API). temperature == 0 means greedy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from scaleinfer.errors import RequestError

_MAX_N = 64
_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions to return for the prompt."""
    temperature: float = 1.0
    """0 = greedy; higher flattens the distribution."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens in prompt or output (>1 discourages repeats)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtract this from logits of tokens that appeared in the output."""
    frequency_penalty: float = 0.0
    """OpenAI-style: subtract this times the count of each token in the output."""
    seed: int | None = None
    """Per-request seed; the result does not depend on what else is in the batch."""
    stop: list[str] | str | None = None
    """Strings that end generation; they are not included in the output text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (in addition to EOS unless ignore_eos)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None = up to the context length."""
    min_tokens: int = 0
    """Generate at least this many tokens before EOS / stop ids may end the request."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """Return the log-probability of the sampled token and of the top-N tokens."""
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: "StructuredOutputsParams | None" = None
    """Constrain the output to a JSON schema, regex, choice or grammar (vLLM's name; guided_decoding
    is accepted too). Compiled and checked when the request is added (structured/)."""
    guided_decoding: "StructuredOutputsParams | None" = None
    """vLLM's older name for structured_outputs."""
    use_beam_search: bool = False
    """Beam search (engine/beam_search.py) instead of sampling: keeps best_of (or n) beams, returns the n
    best finished sequences. Deterministic: needs temperature=0 and no top-k / top-p / min-p / penalties."""
    best_of: int | None = None
    """Beam width under beam search (None = n); must be >= n."""
    length_penalty: float = 1.0
    """Beam search: a finished sequence scores sum(logprobs) / len(output) ** length_penalty (as HF)."""
    early_stopping: bool | str = False
    """Beam search stop rule, as HF: False (stop when no running beam can beat the n-th best finished one at
    its current length), True (stop once best_of sequences finished), "never" (the canonical bound)."""
    patience: float = 1.0
    """Beam search: the finished sequences kept and awaited are round(best_of * patience) instead of best_of
    (openai-whisper / faster-whisper's patience; 1.0 = HF's rule)."""
    logits_processors: list[Callable] | None = None
    """vLLM's per-request hooks: each fn(output_token_ids: list[int], logits: Tensor [vocab]) -> logits,
    applied in order to the request's row before penalties and sampling (Whisper's token suppression and
    timestamp rules; offline use only: they do not travel to other processes)."""
    _stop: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise RequestError("set structured_outputs or guided_decoding (its older name), not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        self._validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    def _validate(self) -> None:
        def bad(name: str, value: object, want: str) -> RequestError:
            return RequestError(f"invalid sampling parameter {name}={value!r}: {want}")

        if not isinstance(self.n, int) or not 1 <= self.n <= _MAX_N:
            raise bad("n", self.n, f"must be an integer from 1 to {_MAX_N}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", self.temperature, "must be between 0 and 100 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be a non-negative integer (0 or -1 disables)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be in (0, 10] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, getattr(self, name), "must be between -2 and 2")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "must be a positive integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must not exceed max_tokens={self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= _MAX_LOGPROBS:
            raise bad("logprobs", self.logprobs, f"must be from 0 to {_MAX_LOGPROBS}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", self.seed, "must be an integer")
        if any(not isinstance(s, str) or not s for s in self._stop):
            raise bad("stop", self.stop, "must be a non-empty string or a list of them")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "must be non-negative integers")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad("structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams")
            if self.ignore_eos:
                raise bad("ignore_eos", True, "cannot be combined with structured_outputs (the grammar ends "
                                              "the output with EOS)")
            if self.use_beam_search:
                raise bad("use_beam_search", True, "cannot be combined with structured_outputs; drop one of them")
        self._validate_beam(bad)

    @property
    def beam_width(self) -> int:
        """Beams kept by beam search (best_of, or n)."""
        return self.best_of if self.best_of is not None else self.n

    def _validate_beam(self, bad) -> None:
        if self.best_of is not None and (not isinstance(self.best_of, int) or not 1 <= self.best_of <= _MAX_N):
            raise bad("best_of", self.best_of, f"must be an integer from 1 to {_MAX_N}")
        if self.best_of is not None and self.best_of < self.n:
            raise bad("best_of", self.best_of, f"must be >= n={self.n} (the n best of best_of are returned)")
        if self.early_stopping not in (False, True, "never"):
            raise bad("early_stopping", self.early_stopping, 'must be true, false or "never"')
        if not self.use_beam_search:
            if self.best_of is not None and self.best_of != self.n:
                raise bad("best_of", self.best_of, "is supported with use_beam_search=true only; use n")
            for name in ("length_penalty", "patience"):
                if getattr(self, name) != 1.0:
                    raise bad(name, getattr(self, name), "applies to beam search only; set use_beam_search")
            return
        if not 0.0 < self.patience <= 16.0:
            raise bad("patience", self.patience, "must be in (0, 16]")
        if not -10.0 <= self.length_penalty <= 10.0:
            raise bad("length_penalty", self.length_penalty, "must be between -10 and 10")
        if self.temperature != 0.0:
            raise bad("temperature", self.temperature, "must be 0 with use_beam_search (beam search is deterministic)")
        for name, off in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0),
                          ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if getattr(self, name) != off:
                raise bad(name, getattr(self, name), "is not supported with use_beam_search; leave it unset")
        if self.seed is not None:
            raise bad("seed", self.seed, "has no effect on beam search (it is deterministic); leave it unset")


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match: exactly one of a JSON schema, a regex, a choice of strings, an EBNF
    grammar (llama.cpp's GBNF dialect, root rule `root`) or any JSON object. Names follow vLLM's
    StructuredOutputsParams. Checked for shape here; compiled (and refused if invalid) by structured/."""

    json: "str | dict | None" = None
    """A JSON schema (a dict or its JSON text)."""
    regex: str | None = None
    choice: "list[str] | None" = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar whose start rule is `root`."""
    json_object: bool | None = None
    """Any JSON object (OpenAI's response_format json_object)."""
    any_whitespace: bool = False
    """JSON may hold free whitespace between tokens (vLLM's default). Off by default here: small models
    given the freedom can emit newlines until max_tokens; off, JSON has one canonical spacing."""

    def __post_init__(self) -> None:
        set_kinds = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise RequestError(f"structured outputs need exactly one of {', '.join(_STRUCTURED_KINDS)}; got "
                               f"{', '.join(set_kinds) or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise RequestError(f"structured outputs json must be a JSON schema (an object or its text), got "
                               f"{type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise RequestError(f"structured outputs {name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise RequestError(f"structured outputs choice must be a non-empty list of non-empty strings, "
                                   f"got {self.choice!r}")
            object.__setattr__(self, "choice", list(self.choice))

    @property
    def kind(self) -> str:
        """Which of json / regex / choice / grammar / json_object is set."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))


GuidedDecodingParams = StructuredOutputsParams
"""vLLM's older name."""


@dataclass
class BeamSearchParams:
    """vLLM's LLM.beam_search parameters (a thin form of SamplingParams(use_beam_search=True))."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def to_sampling_params(self) -> SamplingParams:
        """All beam_width beams are returned, best first."""
        return SamplingParams(n=self.beam_width, best_of=self.beam_width, use_beam_search=True,
                              temperature=self.temperature, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              length_penalty=self.length_penalty,
                              include_stop_str_in_output=self.include_stop_str_in_output)
