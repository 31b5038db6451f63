"""llama.cpp (llama-cpp-python) side of `scaleinfer bench`: runs the same workloads on the same GGUF.

Executed by llama-cpp-python's own interpreter (a separate venv: `scaleinfer bench --llamacpp-python
PATH`), so this file imports nothing from scaleinfer or torch. It reads one JSON line from stdin
(gguf, threads, prefill_ids, decode_ids, decode_tokens, mixed: [[prompt_ids, output_len], ...]), prints
one JSON result line (load, RSS, mixed), then answers `prefill` / `decode` lines with one timed round
each, like the other engines' workers (bench/core.py interleaves them). Decoding is greedy on the returned logits; every output runs to its
set length (no EOS stop), like the other engines. llama-cpp-python runs one sequence at a time, so the
mixed load is served request after request.
"""
from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(sys.stdin.readline())
    start = time.perf_counter()
    longest = max([len(job["prefill_ids"]) + 1, len(job["decode_ids"]) + job["decode_tokens"]]
                  + [len(p) + n for p, n in job["mixed"]])
    llm = Llama(job["gguf"], n_ctx=max(2048, longest), n_threads=job["threads"], n_threads_batch=job["threads"], n_batch=512,
                verbose=False)
    load_s = time.perf_counter() - start
    load_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        rss_after_load_mb = int(f.read().split()[1]) * resource.getpagesize() / 2**20

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        # The last evaluated position's logits, straight from the context: llm.scores is only filled
        # with logits_all=True, which would compute the LM head for every prompt token.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    generated: list[int] = []

    def generate(prompt: list[int], n: int) -> tuple[float, float]:
        """Seconds for the prompt (plus first token) and for the n - 1 following tokens."""
        llm.reset()
        generated.clear()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = next_token()
        generated.append(tok)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = next_token()
            generated.append(tok)
        return t1 - t0, time.perf_counter() - t1

    prefill_ids, decode_ids, n = job["prefill_ids"], job["decode_ids"], job["decode_tokens"]
    generate(prefill_ids, 1)  # warm-up
    generate(decode_ids, n)
    start = time.perf_counter()
    out_tokens = 0
    for prompt, out_len in job["mixed"]:
        generate(prompt, out_len)
        out_tokens += out_len
    mixed_s = time.perf_counter() - start
    print(json.dumps({
        "engine": "llama.cpp", "mode": "gguf", "load_s": load_s, "load_peak_rss_mb": load_rss_mb,
        "rss_after_load_mb": rss_after_load_mb, "mixed_tok_s": out_tokens / mixed_s,
        "mixed": {"seconds": mixed_s, "output_tokens": out_tokens, "max_batch_size": 1},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "llama_cpp_python": __import__("llama_cpp").__version__,
    }), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "prefill":
            res = {"prefill_tok_s": len(prefill_ids) / generate(prefill_ids, 1)[0]}
        elif cmd == "decode":
            res = {"decode_tok_s": (n - 1) / generate(decode_ids, n)[1], "decode_token_ids": list(generated)}
        else:
            res = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
