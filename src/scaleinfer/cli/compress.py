"""prune | distill: write smaller checkpoints (structured pruning) and train them on a teacher's logits."""
from __future__ import annotations

import argparse
import time

from scaleinfer.config import DEFAULT_MODEL


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.75, got {text!r}") from None


def cmd_prune(args) -> int:
    from scaleinfer.compress.prune import PruneTarget, prune_to_dir

    if args.threads is not None:
        __import__("torch").set_num_threads(args.threads)
    target = PruneTarget(layers=args.layers, ffn=args.ffn, heads=args.heads, kv_heads=args.kv_heads,
                         params=args.params)
    if target == PruneTarget():
        from scaleinfer.errors import ConfigError

        raise ConfigError("nothing to prune: give at least one of --layers, --ffn, --heads, --kv-heads, --params")
    start = time.perf_counter()
    report = prune_to_dir(args.model, args.calibration, target, args.output, window=args.window,
                          max_windows=args.max_windows, save_dtype=args.save_dtype, overwrite=args.overwrite)
    plan = report["plan"]
    print(f"wrote {args.output}: {plan['layers']} layers, FFN {plan['intermediate_size']}, {plan['heads']} heads / "
          f"{plan['kv_heads']} KV heads; {report['params_before'] / 1e6:.1f}M -> {report['params_after'] / 1e6:.1f}M "
          f"params ({report['params_after'] / report['params_before']:.1%}) in {time.perf_counter() - start:.1f} s; "
          f"load it with --model {args.output}")
    if "layers_removed" in report:
        print(f"removed layers {report['layers_removed']} (lowest block influence)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prune", help="structured pruning (layers, FFN channels, heads) into a smaller HF checkpoint")
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name, .gguf file or HF directory to prune "
                                                          "(default: %(default)s)")
    p.add_argument("--calibration", required=True, metavar="TEXT_FILE",
                   help="text whose activations score layers, channels and heads (not the text you evaluate on)")
    p.add_argument("--output", required=True, help="directory to write (new or empty)")
    g = p.add_argument_group("target (what to keep; at least one)")
    g.add_argument("--layers", type=int, default=None, help="decoder layers kept (the least influential go)")
    g.add_argument("--ffn", type=_fraction, default=None, help="fraction of FFN channels kept, e.g. 0.75")
    g.add_argument("--heads", type=int, default=None, help="query heads kept per layer")
    g.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA groups) kept per layer")
    g.add_argument("--params", type=_fraction, default=None,
                   help="fraction of parameters kept, e.g. 0.7: sets whichever of --layers / --ffn is not given "
                        "(neither: both shrink by the same factor)")
    p.add_argument("--window", type=int, default=256, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=16, help="calibration windows (default: %(default)s)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(fn=cmd_prune)
