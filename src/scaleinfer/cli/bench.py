"""bench [MODE] | plan: benchmarks against other engines (each mode is a module with add_arguments and main)."""
from __future__ import annotations

import importlib

from scaleinfer.cli.common import engine_args

# `scaleinfer bench MODE`: the module that owns it (its add_arguments(parser) and main(args)) and its help line.
# A new benchmark is one row here.
BENCH_MODES: dict[str, tuple[str, str]] = {
    "serve": ("scaleinfer.bench.serve", "serving benchmark of any OpenAI-compatible endpoint "
                                        "(vLLM benchmark_serving semantics)"),
    "long-context": ("scaleinfer.bench.long_context", "prefill time, KV memory and RSS of attention patterns vs "
                                                      "sequence length; perplexity of a long stream per pattern"),
    "soak": ("scaleinfer.bench.soak.run", "minutes of mixed traffic (streams, disconnects, malformed requests) "
                                          "against a real server: no 5xx, KV blocks back, flat RSS"),
    "structured": ("scaleinfer.bench.structured", "decode time per token with vs without a grammar (structured "
                                                  "outputs) at batch 1 and 32, masks filled during the forward or after"),
    "prune": ("scaleinfer.bench.prune", "pruning targets (and distilled students) vs the full model: parameters, "
                                        "perplexity EN / ZH, prefill and decode speed in one table"),
    "speculative": ("scaleinfer.bench.speculative", "batch-1 decode speed and acceptance of speculative decoding "
                                                    "(none, n-gram, draft model, extra drafts) on code editing, "
                                                    "summarization and chat, next to llama.cpp's prompt lookup"),
    "distributed": ("scaleinfer.bench.distributed", "one process vs data / tensor / pipeline parallel layouts on "
                                                    "the same threads: decode, prefill, mixed load, router overhead"),
    "embed": ("scaleinfer.bench.embed", "sentences/s of encoder models (MiniLM, MPNet): scaleinfer vs "
                                        "sentence-transformers vs onnxruntime, same threads"),
    "seq2seq": ("scaleinfer.bench.seq2seq", "Whisper transcription (5 min of audio; 32 concurrent requests): "
                                            "real-time factor, req/s, WER, peak RSS vs faster-whisper and HF"),
}


def _run_module(args) -> int:
    return importlib.import_module(args.module).main(args)


def cmd_bench(args) -> int:
    from scaleinfer.bench.core import main as bench_main

    return bench_main(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark against HF transformers (prefill, decode, mixed load)")
    engine_args(p)
    p.add_argument("--no-hf", action="store_true", help="measure scaleinfer only")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="smaller workloads (smoke run), one round")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved pp512 + tg128 rounds per engine (medians are reported)")
    p.add_argument("--modes", default=None,
                   help="comma-separated scaleinfer modes, each QUANTIZATION[:KV_DTYPE], e.g. "
                        "none,int8,int4,w8a8,w8a8:int8 (default: --quantization)")
    p.add_argument("--llamacpp-python", default=None,
                   help="python of a venv with llama-cpp-python: also measure llama.cpp on the same GGUF")
    p.set_defaults(fn=cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_mode", metavar="{" + ",".join(BENCH_MODES) + "}")
    for mode, (module, help_line) in BENCH_MODES.items():
        p = bench_sub.add_parser(mode, help=help_line)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(fn=_run_module, module=module)

    from scaleinfer.plan.command import add_arguments as add_plan_arguments

    p = sub.add_parser("plan", help="memory, latency, throughput and communication of tp x pp x dp layouts of a "
                                    "model on devices (arithmetic, nothing runs); recommends one")
    add_plan_arguments(p)
    p.set_defaults(fn=_run_module, module="scaleinfer.plan.command")
