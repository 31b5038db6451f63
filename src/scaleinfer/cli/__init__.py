"""The `scaleinfer` command: each family of subcommands is a module here with a register(sub) function.

generate | chat | demo (generate.py), serve | router (serve.py), models | pull | quantize | eval (models.py),
bench [MODE] | plan (bench.py), embed | export-onnx (encoders.py), transcribe (transcribe.py),
translate | summarize (text2text.py), prune | distill (compress.py).
A new command is a module with register(sub), listed in COMMANDS.
Every ScaleInferError becomes one line on stderr and exit code 2; no tracebacks for bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys

from scaleinfer.cli import bench, compress, encoders, generate, models, serve, text2text, transcribe
from scaleinfer.cli.common import is_worker_rank, make_llm
from scaleinfer.errors import ScaleInferError

COMMANDS = (generate, serve, models, bench, encoders, transcribe, text2text, compress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaleinfer", description="Transformer inference that scales.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the start-up summary (model, KV capacity in tokens, threads)
        logging.getLogger("scaleinfer.engine.engine").setLevel(logging.INFO)
    try:
        if is_worker_rank(args):   # torchrun / --rank R > 0: serve rank 0's engine, no command of its own
            make_llm(args)
        return args.fn(args)
    except ScaleInferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
