"""The OpenAI request bodies the server accepts, as pydantic models; app.py feeds them to openai.py.

Unknown fields are ignored, as OpenAI does. Fields we know but cannot honour (logit_bias,
echo, ...) are accepted here and refused with a clear 400 by openai.refuse_unsupported, so the
message names the field instead of a schema error. Numeric bounds that SamplingParams checks
again are stated here too, so the OpenAPI schema (and a fuzzer reading it) sees them. Text with a lone
UTF-16 surrogate (JSON "\\ud800", which no UTF-8 can carry) is refused before any field is read.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

MAX_SEED = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
    """strict: a field takes its JSON type only ("5" is no integer, 16.0 no max_tokens), as OpenAI."""


def _lone_surrogate(value: Any, path: str) -> str | None:
    """Where the first lone surrogate in a JSON value is ("messages[0].content, character 3"), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{path or 'a string'} (\\u{ord(value[exc.start]):04x} at character {exc.start})"
        return None
    if isinstance(value, dict):
        items = [(k, f"{path}.{k}" if path else str(k)) for k in value]
        for key, where in items:
            found = _lone_surrogate(key, f"a key of {path or 'the body'}") or _lone_surrogate(value[key], where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (str, list, dict)):
                found = _lone_surrogate(item, f"{path}[{i}]")
                if found:
                    return found
    return None


class _Request(_Body):
    """A whole request body: its text must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = _lone_surrogate(data, "")
        if found:
            raise PydanticCustomError("unicode", "{where} holds a lone UTF-16 surrogate, which is not text; send "
                                                 "valid Unicode (escape pairs \\ud83d\\ude00 are fine)",
                                      {"where": found})
        return data


class StreamOptions(_Body):
    include_usage: bool = False
    """Send one more chunk before [DONE] with empty choices and the request's token usage."""


class _SamplingFields(_Request):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""

    model: str | None = None
    """Served model name (see /v1/models); omitted = the one model this server runs."""
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    """Refused unless empty: we do not bias logits."""
    # vLLM-style extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs (serving/structured.py): OpenAI's response_format, vLLM's guided_* and structured_outputs
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    use_beam_search: bool = False
    """Beam search (vLLM's extra): best_of (completions) or n beams, the n best returned; temperature 0."""
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """Text, a batch of texts, token ids, or a batch of token id lists."""
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    """Return the top-N log-probabilities per token (N <= 20)."""
    echo: bool = False
    """Refused when true."""
    suffix: str | None = None
    """Refused unless empty."""
    best_of: int | None = Field(None, ge=1)
    """Beam width with use_beam_search (>= n); otherwise accepted only when equal to n."""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A non-text content part (image_url, input_audio, ...): refused with 400."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(_Body):
    role: str
    """system, developer, user or assistant."""
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    """An assistant message's earlier tool calls ({"id", "type": "function", "function": {"name", "arguments"}})."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """Wins over max_tokens. Neither = up to the context length."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None


class TokenizeRequest(_Request):
    """POST /tokenize: either prompt or messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx body: OpenAI's error object."""

    error: ErrorDetail


_ERROR_STATUSES = {400: "Bad request: invalid JSON, fields or values (the message names which)",
                   401: "Missing or wrong API key (when the server has one)",
                   404: "Unknown route or model", 405: "Method not allowed on this route",
                   413: "Request body over --max-request-bytes", 429: "Too many sequences waiting (--max-waiting)",
                   431: "Request head over --max-header-bytes", 503: "The engine died or the server is shutting down"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_STATUSES.items()}
"""The error responses every route may give, for the OpenAPI schema."""
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or with stream=true server-sent events ('data: {chunk}' lines, then "
                         "'data: [DONE]')", "content": {"application/json": {}, "text/event-stream": {}}}}
"""The 200 of /v1/completions and /v1/chat/completions."""
