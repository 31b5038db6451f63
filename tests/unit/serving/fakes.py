"""A stand-in AsyncEngine and tokenizer for testing the HTTP layer without model weights.

The fake tokenizer maps each UTF-8 byte b to token id b + 3 (0-2 are specials) and can be told to
block on a text (a slow tokenization). The fake engine emits
"abcdef..." one token per step as cumulative outputs, the way AsyncEngine.generate does, honouring n,
max_tokens, stop strings and logprobs, and records which requests finished or were aborted.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

from scaleinfer.request import CompletionOutput, RequestMetrics, RequestOutput
from scaleinfer.sampling_params import SamplingParams

OFFSET = 3
VOCAB = 256 + OFFSET


class FakeTokenizer:
    eos_token_ids = (0,)
    max_token_chars = 1
    chat_template = None
    """No template of its own: tools reach it as a system prompt (serving/tools.py)."""

    def __init__(self):
        self.calls = 0
        self.hold: threading.Event | None = None
        """When set, encoding a text that contains "SLOW" waits (up to 10 s) until the test sets it."""
        self.holding = threading.Event()
        self.hold_timed_out = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls += 1
        if self.hold is not None and "SLOW" in text:
            self.holding.set()
            self.hold_timed_out = not self.hold.wait(10)
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        if any(m["role"] == "assistant" and m["content"] == "BOOM" for m in messages):
            raise ValueError("template says no")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeStats:
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    max_batch_size: int = 0
    last_batch_size: int = 0


@dataclass
class FakeLLMEngine:
    max_model_len: int = 64
    kv_capacity_tokens: int = 1024
    num_kv_blocks: int = 64
    stats: FakeStats = field(default_factory=FakeStats)
    model_config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(
        vocab_size=VOCAB, name="fake", architecture="llama", arch_config=None))
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(
        dtype="float32", scheduler=SimpleNamespace(max_num_seqs=8)))
    scheduler: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(num_running=0, num_waiting=0))
    num_free_blocks: int = 64
    kv_cache_usage: float = 0.0
    structured_seen: list = field(default_factory=list)

    def compile_structured(self, params: SamplingParams):
        """Records the structured outputs asked for; a regex "[" is refused as the real engine would."""
        from scaleinfer.errors import RequestError

        spec = params.structured_outputs
        if spec is not None:
            if spec.regex == "[":
                raise RequestError("invalid structured output regex: Unclosed '['")
            self.structured_seen.append(spec)
    speculator: object = None


class FakeAsyncEngine:
    def __init__(self, step_delay: float = 0.0):
        self.engine = FakeLLMEngine()
        self.tokenizer = FakeTokenizer()
        self.step_delay = step_delay
        self.is_dead = False
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.seen: list[tuple[list[int], SamplingParams]] = []
        self.hold_first: asyncio.Event | None = None
        """When given, no request gets its first token before the test sets it (they all wait)."""

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None):
        self.seen.append((list(prompt), params))
        texts = [""] * params.n
        ids: list[list[int]] = [[] for _ in range(params.n)]
        finish: list[str | None] = [None] * params.n
        done = False
        try:
            if self.hold_first is not None:
                await self.hold_first.wait()
            for step in range(params.max_tokens):
                await asyncio.sleep(self.step_delay)
                for i in range(params.n):
                    if finish[i]:
                        continue
                    ch = chr(ord("a") + (step + i) % 26)
                    ids[i].append(ord(ch) + OFFSET)
                    texts[i] += ch
                    hit = next((s for s in params.stop_strings if s in texts[i]), None)
                    if hit:
                        texts[i] = texts[i][:texts[i].index(hit)]
                        finish[i] = "stop"
                    elif step + 1 == params.max_tokens:
                        finish[i] = "length"
                done = all(finish)
                yield self._output(request_id, prompt, params, texts, ids, finish, done)
                if done:
                    self.finished.append(request_id)
                    return
        finally:
            if not done:
                self.aborted.append(request_id)

    def _output(self, request_id, prompt, params, texts, ids, finish, done) -> RequestOutput:
        outs = []
        for i in range(params.n):
            lps = None
            if params.logprobs is not None:
                lps = [{t: -0.25, **{OFFSET + 32 + k: -1.0 - k for k in range(params.logprobs)}} for t in ids[i]]
            outs.append(CompletionOutput(i, texts[i], list(ids[i]), finish[i], None, lps,
                                         None if lps is None else -0.25 * len(ids[i])))
        return RequestOutput(request_id, None, list(prompt), outs, done,
                             RequestMetrics(0.0, None, None, len(prompt), sum(len(x) for x in ids)))

    async def call(self, fn):
        return fn(self.engine)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        pass

