"""models | pull | quantize | eval: the catalog, quantized checkpoints, and perplexity."""
from __future__ import annotations

import time

from scaleinfer.cli.common import engine_args, make_llm
from scaleinfer.config import DEFAULT_MODEL, QUANTIZATION_MODES


def cmd_models(args) -> int:
    from scaleinfer import catalog

    print(f"{'name':32} {'arch':8} {'quant':8} {'installed':9}  description")
    for e in catalog.list_models():
        print(f"{e.name:32} {e.architecture:8} {e.quantization:8} {'yes' if e.installed else 'no':9}  "
              f"{e.description}")
    return 0


def cmd_pull(args) -> int:
    from scaleinfer import catalog

    path = catalog.pull(args.name)
    print(path)
    return 0


def cmd_quantize(args) -> int:
    from scaleinfer.engine.loading import quantize_to_dir

    if args.threads is not None:
        __import__("torch").set_num_threads(args.threads)
    start = time.perf_counter()
    config = quantize_to_dir(args.model, args.quantization, args.output, overwrite=args.overwrite,
                             calibration=args.calibration)
    layers = config["quantization"]["layers"].values()
    packed = sum(spec["method"] != "rows" for spec in layers)   # a split layer's bands are counted, not it
    print(f"wrote {args.output}: {config['quantization']['mode']}, {packed} packed linears, in "
          f"{time.perf_counter() - start:.1f} s; load it with --model {args.output}")
    return 0


def _same_file(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def cmd_eval_perplexity(args) -> int:
    import json

    from scaleinfer.bench.perplexity import perplexity

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    if args.calibration and _same_file(args.calibration, args.text):
        from scaleinfer.errors import ConfigError

        raise ConfigError("--calibration is the --text being scored: calibrate on a different text, or the "
                          "perplexity overstates the quantized model")
    start = time.perf_counter()
    llm = make_llm(args)
    load_s = time.perf_counter() - start
    result = perplexity(llm, text, window=args.window, max_windows=args.max_windows, step=args.step)
    from scaleinfer.weights.quantized import mode_label, quantization_of

    # a `scaleinfer quantize` dir's own mode, else the one asked for (calibrated on the fly or not)
    mode = quantization_of(llm.engine.checkpoint_path) or mode_label(args.quantization, args.calibration)
    record = {"step": args.step, "model": args.model, "text": args.text, "quantization": mode,
              "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"), "load_s": load_s, **result.to_dict()}
    print(f"perplexity {result.perplexity:.4f} over {result.num_tokens} tokens ({result.num_windows} windows of "
          f"{result.window}), {result.tokens_per_s:.0f} tok/s, quantization {mode}")
    if args.json:
        print(json.dumps(record))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality evaluation (perplexity)")
    eval_sub = p.add_subparsers(dest="eval_mode", metavar="{perplexity}", required=True)
    p = eval_sub.add_parser("perplexity", help="perplexity of a text file, non-overlapping windows")
    engine_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, e.g. data/shakespeare-en.txt")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--step", type=int, default=None,
                   help="feed each window N tokens per forward pass through the KV cache (1: the decode path, "
                        "which is what w4a8's int8 activations affect); default: the whole window at once")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(fn=cmd_eval_perplexity)

    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("pull", help="install a catalog model")
    p.add_argument("name")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("quantize", help="write a quantized checkpoint directory (load it with --model DIR)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="catalog name, a .gguf file, an HF directory or hub id (the source to quantize)")
    p.add_argument("--quantization", required=True,
                   help=f"one of {', '.join(m for m in QUANTIZATION_MODES if m not in ('none', 'auto'))} "
                        f"(see --quantization of generate)")
    p.add_argument("--output", required=True, help="directory to write (new, empty, or an earlier quantize output)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="int4 modes: round with GPTQ on the model's activations over this text (up to 32 "
                        "windows of 512 tokens) instead of to nearest; use a text you will not evaluate on")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(fn=cmd_quantize)
