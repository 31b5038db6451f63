"""generate | chat | demo: a prompt or a conversation through the engine, streamed to the terminal with speeds."""
from __future__ import annotations

import sys
import time

from scaleinfer.cli.common import engine_args, make_llm, make_params, sampling_args


def stream_print(llm, prompt, params, out=sys.stdout) -> tuple[str, int, float, float | None]:
    """Stream one request to `out`; returns (text, output tokens, seconds, seconds to first token)."""
    start = time.perf_counter()
    first = None
    printed = 0
    final = None
    for final in llm.stream(prompt, params):
        text = final.outputs[0].text
        if first is None and final.outputs[0].token_ids:
            first = time.perf_counter() - start
        out.write(text[printed:])
        out.flush()
        printed = len(text)
    elapsed = time.perf_counter() - start
    assert final is not None
    return final.outputs[0].text, len(final.outputs[0].token_ids), elapsed, first


def speed_line(num_tokens: int, elapsed: float, ttft: float | None) -> str:
    decode = ""
    if ttft is not None and num_tokens > 1 and elapsed > ttft:
        decode = f", decode {(num_tokens - 1) / (elapsed - ttft):.1f} tok/s"
    return f"[{num_tokens} tokens in {elapsed:.2f} s: {num_tokens / elapsed:.1f} tok/s{decode}]"


def cmd_generate(args) -> int:
    params = make_params(args)
    llm = make_llm(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    _, n, elapsed, ttft = stream_print(llm, prompt, params)
    print()
    print(speed_line(n, elapsed, ttft), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    params = make_params(args)
    llm = make_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text, n, elapsed, ttft = stream_print(llm, llm.render_chat(messages), params)
        print()
        print(speed_line(n, elapsed, ttft), file=sys.stderr)
        messages.append({"role": "assistant", "content": text})


def cmd_demo(args) -> int:
    """The `make run` job: one completion and one chat reply with the default model, with speeds."""
    from scaleinfer.sampling_params import SamplingParams

    start = time.perf_counter()
    llm = make_llm(args)
    eng = llm.engine
    print(f"model {args.model} (quantization {args.quantization}): loaded in {time.perf_counter() - start:.1f} s, "
          f"KV cache {eng.kv_capacity_tokens} tokens, threads {__import__('torch').get_num_threads()}")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    prompt = "The three most important inventions of the 20th century are"
    print(f"\n--- completion ---\n{prompt}", end="")
    _, n, elapsed, ttft = stream_print(llm, prompt, params)
    print("\n" + speed_line(n, elapsed, ttft))
    question = "What is the capital of France? Answer in one sentence."
    print(f"\n--- chat ---\nuser: {question}\nassistant: ", end="")
    ids = llm.render_chat([{"role": "user", "content": question}])
    _, n, elapsed, ttft = stream_print(llm, ids, params)
    print("\n" + speed_line(n, elapsed, ttft))
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt (argument or stdin), streaming")
    p.add_argument("prompt", nargs="?", default=None)
    engine_args(p)
    sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's template, streaming")
    p.add_argument("--system", default=None, help="system prompt")
    engine_args(p)
    sampling_args(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("demo", help="a completion and a chat reply with the default model, with speeds")
    engine_args(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(fn=cmd_demo)
