"""llama.cpp (llama-cpp-python) side of `scaleinfer bench speculative`: batch-1 greedy decode of the same
prompts on the same GGUF, plain and with llama-cpp-python's speculative decoding (LlamaPromptLookupDecoding,
its prompt-lookup draft; it offers no draft-model class of its own).

Executed by llama-cpp-python's own interpreter (a separate venv), so it imports nothing from scaleinfer or
torch. Reads one JSON line from stdin (gguf, threads, max_tokens, rounds, num_pred_tokens, prompts:
{name: ids}) and prints one JSON line: {mode: {name: {decode_tok_s, output_tokens, token_ids}}}. Decode
tok/s counts the tokens after the first over the time after the first (as the scaleinfer side does);
generation stops at EOS or max_tokens.
"""
from __future__ import annotations

import json
import sys
import time


def run(llm, ids: list[int], max_tokens: int) -> tuple[float, list[int]]:
    eos = llm.token_eos()
    out: list[int] = []
    first = None
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        if first is None:
            first = time.perf_counter()
        out.append(int(token))
        if token == eos or len(out) >= max_tokens:
            break
    seconds = time.perf_counter() - first
    return (len(out) - 1) / seconds if len(out) > 1 and seconds > 0 else 0.0, out


def main() -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    job = json.loads(sys.stdin.readline())
    longest = max(len(ids) for ids in job["prompts"].values()) + job["max_tokens"] + 16
    results: dict[str, dict] = {}
    for mode in ("llama.cpp", "llama.cpp prompt-lookup"):
        draft = LlamaPromptLookupDecoding(num_pred_tokens=job["num_pred_tokens"]) if "lookup" in mode else None
        # logits_all=True with a draft: llama-cpp-python turns logits_all on for a draft model but sizes its
        # score buffer from the argument (n_batch rows), so the prompt's logits overflow it without this
        llm = Llama(job["gguf"], n_ctx=max(2048, longest), logits_all=draft is not None, n_threads=job["threads"],
                    n_threads_batch=job["threads"], n_batch=512, draft_model=draft, verbose=False)
        results[mode] = {}
        for name, ids in job["prompts"].items():
            best, tokens = 0.0, []
            for _ in range(job["rounds"]):
                tok_s, tokens = run(llm, ids, job["max_tokens"])
                best = max(best, tok_s)
            results[mode][name] = {"decode_tok_s": best, "output_tokens": len(tokens), "token_ids": tokens}
        del llm
    results["llama_cpp_python"] = __import__("llama_cpp").__version__
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
