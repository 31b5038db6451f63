"""What the router reads from a request body to route it (RouteInfo): the text whose prefix decides
cache affinity and an estimate of the tokens the request puts on a replica. Never fails: a body the
router cannot read is routed with an empty RouteInfo, and the replica answers it (400)."""
from __future__ import annotations

import json

from scaleinfer.serving.router.policies import RouteInfo

CHARS_PER_TOKEN = 4
"""The prompt-token estimate divides characters by this (no tokenizer in the router)."""
CHAT_MAX_TOKENS = 256
"""Tokens assumed for a chat request without max_tokens (the replica allows up to its context)."""
COMPLETION_MAX_TOKENS = 16
"""OpenAI's default max_tokens of /v1/completions (as the server's)."""


def _prompt_text(prompt) -> tuple[str, int]:
    """(text of the first prompt, number of prompts) of a completions `prompt` field."""
    if isinstance(prompt, str):
        return prompt, 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return " ".join(map(str, prompt)), 1
        first = prompt[0]
        text = first if isinstance(first, str) else " ".join(map(str, first)) if isinstance(first, list) else ""
        return text, len(prompt)
    return "", 1


def _chat_text(messages) -> str:
    """The conversation as one string, turn by turn (the chat template keeps this order)."""
    parts = []
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict):
            content = m.get("content")
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            parts.append(f"<{m.get('role')}>{text}")
    return "".join(parts)


def _int(value, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def route_info(path: str, body: bytes) -> RouteInfo:
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return RouteInfo()
    if not isinstance(req, dict):
        return RouteInfo()
    n = _int(req.get("n"), 1)
    if path == "/v1/chat/completions":
        text, prompts = _chat_text(req.get("messages")), 1
        max_tokens = _int(req.get("max_completion_tokens") or req.get("max_tokens"), CHAT_MAX_TOKENS)
    else:
        text, prompts = _prompt_text(req.get("prompt"))
        max_tokens = _int(req.get("max_tokens"), COMPLETION_MAX_TOKENS)
    est = prompts * (len(text) // CHARS_PER_TOKEN + n * max_tokens)
    return RouteInfo(prefix_text=text, est_tokens=est)
