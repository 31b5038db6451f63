"""The soak's request mix: a seeded generator of valid and malformed OpenAI requests.

Valid requests go to chat or completions, streaming or not, with tiny max_tokens; a share of them
is cut by the client (a stream after a few events, a non-streaming request after a short wait).
Malformed requests come in the kinds of MALFORMED_KINDS, and each one must be answered with a 4xx.
Bodies are built here as bytes (json.dumps with ensure_ascii), so a lone surrogate travels as the
JSON escape "\\ud800" exactly as a careless client would send it.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
VALID = "valid"
MALFORMED_KINDS = ("bad_json", "wrong_type", "unknown_model", "too_long_prompt", "out_of_range",
                   "lone_surrogate", "missing_field", "oversized_body")

_TOPICS = ("the sea", "a red fox", "prime numbers", "the moon", "bread", "a lighthouse", "rain in April",
           "an old clock", "the alphabet", "mountains", "a paper boat", "coffee", "winter", "a small robot")
_ASKS = ("Write one sentence about", "Tell me a fact about", "Describe", "Give three words about",
         "Say something kind about", "Explain briefly")
_WORDS = ("river", "stone", "garden", "window", "yellow", "music", "silver", "forest", "candle", "harbor")


@dataclass(frozen=True)
class MixConfig:
    model: str
    """The served model name (GET /v1/models)."""
    max_model_len: int
    """The server's context length: too_long_prompt goes past it."""
    max_tokens: int = 32
    disconnect_share: float = 0.1
    """Share of valid requests the client cuts mid-way."""
    malformed_share: float = 0.2
    oversized_bytes: int = 8 * 2**20
    """Size of an oversized_body request; it must exceed the server's body limit."""
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS
    """The kinds drawn for malformed requests."""


@dataclass(frozen=True)
class SoakRequest:
    kind: str
    """VALID or one of MALFORMED_KINDS."""
    endpoint: str
    body: bytes
    stream: bool
    disconnect_after_events: int | None = None
    """Streaming: close the connection after this many SSE data events."""
    disconnect_after_s: float | None = None
    """Non-streaming: give up (close the connection) after this many seconds."""

    @property
    def malformed(self) -> bool:
        return self.kind != VALID

    @property
    def disconnects(self) -> bool:
        return self.disconnect_after_events is not None or self.disconnect_after_s is not None


def _encode(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=True).encode("ascii")


def _prompt(rng: random.Random) -> str:
    return f"{rng.choice(_ASKS)} {rng.choice(_TOPICS)}."


def valid_body(rng: random.Random, cfg: MixConfig, chat: bool, stream: bool, max_tokens: int) -> dict:
    body: dict = {"model": cfg.model, "temperature": rng.choice((0.0, 0.0, 0.7)), "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
        if rng.random() < 0.3:
            body["messages"].insert(0, {"role": "system", "content": "You are brief."})
        body["max_completion_tokens" if rng.random() < 0.5 else "max_tokens"] = max_tokens
    else:
        body["prompt"] = _prompt(rng)
        body["max_tokens"] = max_tokens
    if stream:
        body["stream_options"] = {"include_usage": True}
    if body["temperature"]:
        body["seed"] = rng.randrange(2**31)
    if rng.random() < 0.1:
        body["n"] = 2
    return body


def _draw_valid(rng: random.Random, cfg: MixConfig) -> SoakRequest:
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    endpoint = CHAT if chat else COMPLETIONS
    if rng.random() >= cfg.disconnect_share:
        body = valid_body(rng, cfg, chat, stream, rng.randint(1, cfg.max_tokens))
        return SoakRequest(VALID, endpoint, _encode(body), stream)
    # to be cut: long enough to be still running when the client leaves
    body = valid_body(rng, cfg, chat, stream, max(64, 4 * cfg.max_tokens)) | {"ignore_eos": True}
    if stream:
        return SoakRequest(VALID, endpoint, _encode(body), True, disconnect_after_events=rng.randint(1, 4))
    return SoakRequest(VALID, endpoint, _encode(body), False, disconnect_after_s=rng.uniform(0.05, 1.0))


def _malformed_body(kind: str, rng: random.Random, cfg: MixConfig, chat: bool) -> bytes:
    body = valid_body(rng, cfg, chat, rng.random() < 0.5, rng.randint(1, cfg.max_tokens))
    text_key = "messages" if chat else "prompt"
    if kind == "bad_json":
        text = _encode(body).decode()
        return rng.choice((text[:-rng.randint(1, 8)], text.replace('"', "'"), text[:-1] + ",}",
                           "model=" + cfg.model, "")).encode()
    if kind == "wrong_type":
        field, value = rng.choice(((text_key, {"text": "hi"} if not chat else "hello"), ("max_tokens", "many"),
                                   ("temperature", "hot"), ("n", [2]), ("stream_options", "usage")))
        return _encode(body | {field: value})
    if kind == "unknown_model":
        return _encode(body | {"model": f"no-such-model-{rng.randrange(16**6):06x}"})
    if kind == "too_long_prompt":
        words = " ".join(rng.choice(_WORDS) for _ in range(cfg.max_model_len + 16))
        return _encode(body | ({"messages": [{"role": "user", "content": words}]} if chat else {"prompt": words}))
    if kind == "out_of_range":
        field, value = rng.choice((("n", 0), ("n", -1), ("n", 10**6), ("max_tokens", 0), ("max_tokens", -5),
                                   ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5)))
        return _encode({k: v for k, v in body.items() if k != "max_completion_tokens"} | {field: value})
    if kind == "lone_surrogate":
        bad = rng.choice(("\ud800", "\udfff", "\udc00"))
        text = rng.choice((bad + _prompt(rng), _prompt(rng) + bad, "a" + bad + "b"))
        return _encode(body | ({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}))
    if kind == "missing_field":
        if chat and rng.random() < 0.5:
            return _encode(body | {"messages": [{"content": "no role here"}]})
        return _encode({k: v for k, v in body.items() if k != text_key})
    if kind == "oversized_body":
        return _encode(body | {"padding": "x" * cfg.oversized_bytes})
    raise ValueError(f"unknown malformed kind {kind!r}")


def draw(rng: random.Random, cfg: MixConfig) -> SoakRequest:
    """The next request of the mix."""
    if rng.random() >= cfg.malformed_share:
        return _draw_valid(rng, cfg)
    kind = rng.choice(cfg.malformed_kinds)
    chat = rng.random() < 0.5
    body = _malformed_body(kind, rng, cfg, chat)
    stream = b'"stream": true' in body
    return SoakRequest(kind, CHAT if chat else COMPLETIONS, body, stream)
