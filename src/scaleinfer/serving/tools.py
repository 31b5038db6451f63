"""Tool calling for the chat API: `tools` + `tool_choice` -> the prompt and output constraint, and the
model's output -> OpenAI `tool_calls` (whole, or as stream deltas).

    tool_choice "none" (or no tools)  free text; the tools are left out of the prompt
    "auto"                            tools in the prompt; the model's <tool_call>{...}</tool_call>
                                      blocks (Qwen / Hermes format) are parsed out of its text
    "required"                        output constrained to a JSON array of {"name", "arguments"}
                                      (one item when parallel_tool_calls is false)
    {"type": "function", ...} named   output constrained to that function's arguments (its schema)

Tools reach the model through its chat template when the template takes `tools` (Qwen2.5's does); a
template that does not (SmolLM2's) gets them as a system prompt in the same Hermes format, with
earlier tool calls and tool results written as text.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from scaleinfer.errors import RequestError
from scaleinfer.serving.tool_json import scan_array, scan_call
from scaleinfer.sampling_params import StructuredOutputsParams

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_SYSTEM_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                  "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
                  "function call, return a json object with function name and arguments within "
                  "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
                  "<args-json-object>}}\n</tool_call>")


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict]
    """The function tools as sent ({"type": "function", "function": {...}})."""
    mode: str
    """"auto", "required" or "named"."""
    name: str | None = None
    """The function of a named tool_choice."""
    structured: StructuredOutputsParams | None = None
    """The output constraint of "required" and named choices."""


def tool_plan(tools: list | None, tool_choice, parallel_tool_calls: bool | None = None) -> ToolPlan | None:
    """The plan for a request's tools and tool_choice; None when no tool may be called.
    parallel_tool_calls=False: "required" makes exactly one call (small models tend to repeat calls)."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        raise RequestError(f"tool_choice={tool_choice!r} is not supported; use 'none', 'auto', 'required' or "
                           f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    if tool_choice == "none":
        return None
    if not tools:
        raise RequestError(f"tool_choice={tool_choice!r} needs tools; send a non-empty tools list")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    names = [f["name"] for f in functions]
    if tool_choice == "auto":
        return ToolPlan(list(tools), "auto")
    if tool_choice == "required":
        items = [{"type": "object", "properties": {"name": {"enum": [f["name"]]}, "arguments": _parameters(f)},
                  "required": ["name", "arguments"]} for f in functions]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(list(tools), "required", structured=StructuredOutputsParams(json=schema))
    name = _named_choice(tool_choice)
    if name not in names:
        raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools {names}")
    schema = _parameters(functions[names.index(name)])
    return ToolPlan(list(tools), "named", name, StructuredOutputsParams(json=schema))


def _function(index: int, tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise RequestError(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           f"\"parameters\": {{...}}}}}}")
    fn = tool["function"]
    if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
        raise RequestError(f"tools[{index}].function.name must be 1-64 letters, digits, '_', '.' or '-', got "
                           f"{fn.get('name')!r}")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise RequestError(f"tools[{index}].function.parameters must be a JSON schema object")
    return fn


def _parameters(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def _named_choice(choice) -> str:
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise RequestError(f"tool_choice {choice!r} is not supported; a named choice is "
                           f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
    return fn["name"]


# ---- the prompt --------------------------------------------------------------------------------
def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def prepare_chat(messages: list[dict], plan: ToolPlan | None, template: str | None) -> tuple[list[dict], dict]:
    """(messages, extra template arguments): tools through the template when it takes them, else as
    a system prompt with tool calls and results written as text."""
    if template_takes_tools(template):
        return messages, ({"tools": plan.tools} if plan is not None else {})
    out = [_as_text(m) for m in messages]
    if plan is not None:
        prompt = _SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _as_text(message: dict) -> dict:
    """A message with tool calls or a tool result as a plain {"role", "content"} message."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return {"role": message["role"], "content": message["content"]}
    blocks = [f"{TOOL_CALL_OPEN}\n{json.dumps(_call_body(c), ensure_ascii=False)}\n{TOOL_CALL_CLOSE}" for c in calls]
    return {"role": "assistant", "content": "\n".join(filter(None, [message["content"], *blocks]))}


def _call_body(call: dict) -> dict:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


# ---- the output --------------------------------------------------------------------------------
def new_call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def parse_output(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished output under `plan`."""
    if plan.mode == "named":
        return None, [new_call(plan.name, text)]
    if plan.mode == "required":
        try:
            json.loads(text)
        except ValueError:
            return text, []   # cut short by max_tokens: no call to report
        return None, [new_call(c.name, c.arguments(text, True)) for c in scan_array(text)]
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        call = _bare_call(text, plan)
        return (None, [call]) if call is not None else (text, [])
    calls = []
    for body in _BLOCK.findall(text[start:]):
        try:
            call = json.loads(body)
        except ValueError:
            return text, []   # not a well-formed call: leave the text as the model wrote it
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        args = scan_call(body, 0).arguments(body, True)   # as written: what the stream sent
        calls.append(new_call(call["name"], args if args is not None else call.get("arguments", {})))
    content = text[:start].strip()
    return content or None, calls


def _bare_call(text: str, plan: ToolPlan) -> dict | None:
    """A whole output that is one call object ({"name": a tool, "arguments": {...}}), bare or in a ```json
    fence, as small models often write instead of the <tool_call> tags; None otherwise."""
    body = _FENCE.sub("", text.strip()).strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    names = {t["function"]["name"] for t in plan.tools}
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    args = call.get("arguments", call.get("parameters", {}))
    return new_call(call["name"], args) if isinstance(args, (dict, str)) else None


def _may_be_bare_call(text: str) -> bool:
    """The output so far could still become a bare call object: hold it back while streaming."""
    head = text.lstrip()
    return not head or head.startswith(("{", "```")) or "```".startswith(head)


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass
class ToolStream:
    """Streams one choice under a tool plan: text before a tool call goes out as content deltas (holding
    back what could be the start of "<tool_call>"); a tool call goes out as OpenAI streams it: a first
    delta with its id, type and name once the name is written, then its arguments piece by piece as the
    model writes them (tool_json.py finds them), so the concatenated argument deltas equal the
    non-streamed call's arguments. A bare call object in "auto" mode (no <tool_call> tags) cannot be told
    from text until the end and goes out whole when the choice finishes."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0
    calls: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    """The ids of the calls whose first delta went out."""
    args_sent: list[str] = field(default_factory=list)
    """The arguments text sent so far, per call."""

    def content_delta(self, text: str, finished: bool) -> str:
        """The content to send now for the choice's text so far."""
        self.text = text
        if self.plan.mode != "auto":
            return ""
        start = text.find(TOOL_CALL_OPEN)
        end = len(text) if start < 0 else start
        if start < 0 and self.sent == 0 and _may_be_bare_call(text):
            return ""   # decided at the end (finish)
        if not finished and start < 0:
            for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
                if text.endswith(TOOL_CALL_OPEN[:k]):
                    end = len(text) - k
                    break
        if finished and start >= 0:
            end = len(text[:start].rstrip())
        delta, self.sent = text[self.sent:end] if end > self.sent else "", max(self.sent, end)
        return delta

    def progress(self, text: str) -> list[tuple[str | None, str | None]]:
        """(name, arguments so far) of each call in the text so far, in order."""
        if self.plan.mode == "named":
            return [(self.plan.name, text)]
        if self.plan.mode == "required":
            return [(c.name, c.arguments(text)) for c in scan_array(text)]
        out, pos = [], 0
        while (start := text.find(TOOL_CALL_OPEN, pos)) >= 0:
            call = scan_call(text, start + len(TOOL_CALL_OPEN))
            if call.malformed:
                break
            out.append((call.name, call.arguments(text)))
            if call.end is None:
                break
            pos = call.end
        return out

    def call_deltas(self, text: str) -> list[dict]:
        """The tool_calls delta entries to send now (new calls' heads, arguments pieces)."""
        self.text = text
        return self._deltas(self.progress(text))

    def _deltas(self, progress) -> list[dict]:
        out = []
        for k, (name, args) in enumerate(progress):
            if name is None:
                break
            entry: dict = {"index": k}
            if k == len(self.ids):
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.args_sent.append("")
                entry.update(id=self.ids[k], type="function", function={"name": name, "arguments": ""})
            if args and len(args) > len(self.args_sent[k]) and args.startswith(self.args_sent[k]):
                entry.setdefault("function", {})["arguments"] = args[len(self.args_sent[k]):]
                self.args_sent[k] = args
            if len(entry) > 1:
                out.append(entry)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end: any content not yet sent (an unparsable call stays text), and the tool calls
        (with the ids their streamed heads had)."""
        content, self.calls = parse_output(self.text, self.plan)
        for call, call_id in zip(self.calls, self.ids):
            call["id"] = call_id
        rest = ""
        if not self.calls and not self.ids:      # calls already streamed and cut short: no content
            rest = (content or "")[self.sent:] if self.plan.mode == "auto" else (content or "")
        return rest, self.calls

    def closing_deltas(self) -> list[dict]:
        """After finish(): the rest of every final call (what the stream has not sent)."""
        return self._deltas([(c["function"]["name"], c["function"]["arguments"]) for c in self.calls])


def tool_stream_choices(stream: ToolStream, delta, output) -> list[dict]:
    """The chunk choices (OpenAI's shape) for one choice's stream delta under a tool plan: content
    deltas as they come, tool call heads and argument pieces as they are written, then an empty delta
    with finish_reason "tool_calls"."""
    c = output.outputs[delta.index]
    finished = delta.finish_reason is not None
    out = []
    text = stream.content_delta(c.text, finished)
    calls = stream.call_deltas(c.text)
    if finished:
        rest, _ = stream.finish()
        text += rest
        calls += stream.closing_deltas()
    if text:
        out.append({"index": delta.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
    if calls:
        out.append({"index": delta.index, "delta": {"tool_calls": _merge(calls)}, "logprobs": None,
                    "finish_reason": None})
    if finished:
        reason = "tool_calls" if stream.calls and delta.finish_reason == "stop" else delta.finish_reason
        out.append({"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": reason})
    return out


def _merge(entries: list[dict]) -> list[dict]:
    """One tool_calls delta entry per call index (argument pieces joined)."""
    merged: dict[int, dict] = {}
    for e in entries:
        m = merged.setdefault(e["index"], {"index": e["index"]})
        for key, value in e.items():
            if key == "function":
                fn = m.setdefault("function", {})
                for k, v in value.items():
                    fn[k] = fn.get(k, "") + v if k == "arguments" else v
            elif key != "index":
                m[key] = value
    return list(merged.values())
