"""Pure translation between OpenAI bodies and the engine: requests -> SamplingParams, RequestOutputs ->
response JSON (whole responses and stream chunks). No I/O, no engine calls; app.py feeds it.

Engine outputs are cumulative; StreamCursor turns them into deltas (the engine's detokenizer never
splits a UTF-8 character, so each text delta is whole characters).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from scaleinfer.errors import RequestError
from scaleinfer.request import CompletionOutput, RequestOutput
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams
from scaleinfer.serving.protocol import MAX_SEED, ChatCompletionRequest, ChatMessage, CompletionRequest, TextPart
from scaleinfer.serving.tools import ToolPlan, parse_output

TokenText = Callable[[int], str]
"""Maps a token id to its text, for logprobs."""

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class Header:
    """What every response and chunk of one request repeats."""

    id: str
    created: int
    model: str


# ---- requests ----------------------------------------------------------------------------------
def refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Raise RequestError naming the first field we understand but cannot honour."""
    if req.logit_bias:
        raise RequestError("logit_bias is not supported by this server; remove it")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise RequestError("echo=true is not supported by this server; prepend the prompt yourself")
        if req.suffix:
            raise RequestError("suffix (insertion) is not supported by this server; remove it")
        if req.best_of is not None and req.best_of != req.n and not req.use_beam_search:
            raise RequestError(f"best_of={req.best_of} is supported with use_beam_search=true only; "
                               f"otherwise send best_of == n ({req.n})")
        return
    if req.functions or req.function_call is not None:
        raise RequestError("functions / function_call (deprecated) are not supported; send tools and tool_choice")
    if req.modalities and set(req.modalities) != {"text"}:
        raise RequestError(f"modalities={req.modalities} is not supported; only ['text']")
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs=true")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages -> [{"role", "content"}] for the chat template; refuses what we cannot render."""
    out = []
    for i, msg in enumerate(messages):
        role = _ROLES.get(msg.role)
        if role is None:
            raise RequestError(f"messages[{i}].role={msg.role!r} is not supported; use one of "
                               f"{sorted(_ROLES)}")
        if msg.content is None or isinstance(msg.content, str):
            text = msg.content or ""
        else:
            bad = [p.type for p in msg.content if not isinstance(p, TextPart)]
            if bad:
                raise RequestError(f"messages[{i}] has a {bad[0]!r} content part; this server takes text only")
            text = "\n".join(p.text for p in msg.content if isinstance(p, TextPart))
        out.append({"role": role, "content": text})
        if msg.tool_calls:
            if role != "assistant":
                raise RequestError(f"messages[{i}] has tool_calls but role {msg.role!r}; only assistant messages do")
            out[-1]["tool_calls"] = [_tool_call(i, j, c) for j, c in enumerate(msg.tool_calls)]
        if role == "tool":
            out[-1]["tool_call_id"] = msg.tool_call_id
    return out


def _tool_call(i: int, j: int, call) -> dict:
    """An assistant message's tool call as chat templates read it (arguments as an object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                           f"{{\"name\", \"arguments\"}}}}")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            raise RequestError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompt field as a list of prompts (text or token ids)."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RequestError("prompt is an empty list; send a string, a list of strings or token ids")
    if isinstance(p[0], int):
        return [list(p)]  # type: ignore[arg-type]
    return list(p)  # type: ignore[arg-type]


def sampling_params(req: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                    max_model_len: int, vocab_size: int | None = None,
                    structured: StructuredOutputsParams | None = None) -> SamplingParams:
    """The request's SamplingParams. max_tokens is clamped to the room the context leaves; a top_k
    of the vocabulary size or more means no top-k. `structured`: the output constraint (the body's
    own, serving/structured.py, or its tool choice's)."""
    room = max_model_len - num_prompt_tokens
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = req.max_tokens
        logprobs = req.logprobs
    seed = None if req.seed is None else req.seed % (MAX_SEED + 1)
    default_temperature = 0.0 if req.use_beam_search else 1.0
    return SamplingParams(
        n=req.n,
        temperature=default_temperature if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None or (vocab_size is not None and req.top_k >= vocab_size) else req.top_k,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        max_tokens=min(max_tokens or room, room),
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured_outputs=structured,
        use_beam_search=req.use_beam_search,
        best_of=req.best_of if isinstance(req, CompletionRequest) else None,
        length_penalty=req.length_penalty,
        early_stopping=req.early_stopping,
    )


# ---- responses ---------------------------------------------------------------------------------
def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(out: CompletionOutput, start: int, stop: int, num_top: int, token_text: TokenText,
                        text_offset: int = 0) -> dict | None:
    """OpenAI legacy logprobs for output tokens [start, stop)."""
    if out.logprobs is None:
        return None
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for tid, entry in zip(out.token_ids[start:stop], out.logprobs[start:stop]):
        text = token_text(tid)
        offsets.append(text_offset)
        text_offset += len(text)
        tokens.append(text)
        token_logprobs.append(entry[tid])
        tops.append({token_text(t): lp for t, lp in _top(entry, num_top)})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(out: CompletionOutput, start: int, stop: int, num_top: int, token_text: TokenText) -> dict | None:
    """Chat logprobs ({"content": [...]}) for output tokens [start, stop)."""
    if out.logprobs is None:
        return None

    def item(tid: int, lp: float) -> dict:
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, entry in zip(out.token_ids[start:stop], out.logprobs[start:stop]):
        content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in _top(entry, num_top)]})
    return {"content": content}


def completion_body(head: Header, outputs: list[RequestOutput], num_top: int, token_text: TokenText) -> dict:
    """The whole /v1/completions response; outputs are in prompt order."""
    choices = []
    for p, ro in enumerate(outputs):
        for c in ro.outputs:
            choices.append({"index": p * len(ro.outputs) + c.index, "text": c.text,
                            "logprobs": completion_logprobs(c, 0, len(c.token_ids), num_top, token_text),
                            "finish_reason": c.finish_reason})
    return {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
            "choices": choices, "usage": usage(outputs)}


def chat_body(head: Header, output: RequestOutput, num_top: int, token_text: TokenText,
              plan: ToolPlan | None = None) -> dict:
    """The whole /v1/chat/completions response; with a tool plan, the tool calls in the output."""
    choices = []
    for c in output.outputs:
        message, reason = {"role": "assistant", "content": c.text}, c.finish_reason
        if plan is not None:
            content, calls = parse_output(c.text, plan)
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            reason = "tool_calls" if calls and reason == "stop" else reason
        choices.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(c, 0, len(c.token_ids), num_top, token_text),
                        "finish_reason": reason})
    return {"id": head.id, "object": "chat.completion", "created": head.created, "model": head.model,
            "choices": choices, "usage": usage([output])}


@dataclass
class _Cursor:
    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    finished: bool = False


@dataclass
class Delta:
    index: int
    text: str
    token_start: int
    token_stop: int
    finish_reason: str | None


@dataclass
class StreamCursor:
    """Remembers what each choice has already sent and yields only what is new."""

    _cursors: dict[int, _Cursor] = field(default_factory=dict)

    def deltas(self, output: RequestOutput, base_index: int = 0) -> list[Delta]:
        """What is new in each choice. A token whose text is held back (half a UTF-8 character) is
        sent with the text that completes it, unless logprobs are on: then it goes out at once."""
        out = []
        for c in output.outputs:
            index = base_index + c.index
            cur = self._cursors.setdefault(index, _Cursor())
            if cur.finished:
                continue
            text = c.text[cur.text_len:]
            start, stop = cur.num_tokens, len(c.token_ids)
            if not text and not c.finished and (start == stop or c.logprobs is None):
                continue
            out.append(Delta(index, text, start, stop, c.finish_reason))
            cur.text_len, cur.num_tokens, cur.finished = len(c.text), stop, c.finished
        return out

    def offset(self, index: int, advance: int) -> int:
        """Text offset of a choice's next token (for legacy logprobs), then move it by `advance`."""
        cur = self._cursors.setdefault(index, _Cursor())
        start = cur.text_offset
        cur.text_offset += advance
        return start


def completion_chunk(head: Header, choices: list[dict], with_usage: bool) -> dict:
    chunk = {"id": head.id, "object": "text_completion", "created": head.created, "model": head.model,
             "choices": choices}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk_choice(delta: Delta, output: RequestOutput, cursor: StreamCursor, num_top: int,
                            token_text: TokenText) -> dict:
    c = output.outputs[delta.index % len(output.outputs)]
    logprobs = None
    if c.logprobs is not None:
        offset = cursor.offset(delta.index, 0)
        logprobs = completion_logprobs(c, delta.token_start, delta.token_stop, num_top, token_text, offset)
        cursor.offset(delta.index, sum(len(t) for t in logprobs["tokens"]))
    return {"index": delta.index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}


def chat_chunk(head: Header, choices: list[dict], with_usage: bool) -> dict:
    chunk = {"id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": head.model,
             "choices": choices}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_role_choice(index: int) -> dict:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def chat_chunk_choice(delta: Delta, output: RequestOutput, num_top: int, token_text: TokenText) -> dict:
    c = output.outputs[delta.index]
    return {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
            "logprobs": chat_logprobs(c, delta.token_start, delta.token_stop, num_top, token_text),
            "finish_reason": delta.finish_reason}


def usage_chunk(head: Header, obj: str, outputs: list[RequestOutput]) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    return {"id": head.id, "object": obj, "created": head.created, "model": head.model, "choices": [],
            "usage": usage(outputs)}
