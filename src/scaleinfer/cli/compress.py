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


def _progress(total: int, done: int):
    """A tqdm bar with the loss on a terminal; otherwise one plain line per step on stderr."""
    import sys

    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, desc="distill", unit="step", file=sys.stderr)

        def on_step(r):
            bar.set_postfix(loss=f"{r['loss']:.3f}", kl=f"{r['kl']:.3f}", ce=f"{r['ce']:.3f}", refresh=False)
            bar.update(1)
        return on_step, bar.close

    def on_line(r):
        print(f"step {r['step']}/{total} loss {r['loss']:.4f} kl {r['kl']:.4f} ce {r['ce']:.4f} lr {r['lr']:.2e} "
              f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)
    return on_line, lambda: None


def cmd_distill(args) -> int:
    import json
    import os

    from scaleinfer.compress.distill import LOG_FILE, DistillConfig, distill_to_dir

    if args.threads is not None:
        __import__("torch").set_num_threads(args.threads)
    cfg = DistillConfig(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, weight_decay=args.weight_decay, temperature=args.temperature,
                        top_k=args.top_k, alpha=args.alpha, clip=args.clip, holdout=args.holdout, seed=args.seed,
                        save_every=args.save_every, bf16=args.bf16, freeze_embeddings=args.freeze_embeddings,
                        device=args.device)
    cfg.check()
    done = 0
    log = os.path.join(args.output, LOG_FILE)
    if args.resume and os.path.isfile(log):
        with open(log, encoding="utf-8") as f:
            done = sum(1 for _ in f)
    on_step, close = _progress(args.steps, min(done, args.steps))
    try:
        meta = distill_to_dir(args.teacher, args.student, args.text, args.output, cfg, resume=args.resume,
                              overwrite=args.overwrite, on_step=on_step)
    finally:
        close()

    def ppl(key):
        return f"{meta[key]:.3f}" if meta.get(key) is not None else "-"
    print(f"wrote {args.output}: {meta.get('steps_done', 0)} steps in {meta['seconds']:.0f} s, final loss "
          f"{meta['final_loss']:.4f}; held-out perplexity: teacher {ppl('held_out_ppl_teacher')}, student before "
          f"{ppl('held_out_ppl_start')}, after {ppl('held_out_ppl_end')}; load it with --model {args.output}")
    if args.json:
        print(json.dumps(meta))
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

    p = sub.add_parser("distill", help="train a student on a teacher's logits (KL on top-k + next-token loss), "
                                       "resumable; writes an HF checkpoint")
    p.add_argument("--teacher", default=DEFAULT_MODEL, help="catalog name, .gguf or HF directory (default: "
                                                            "%(default)s)")
    p.add_argument("--student", required=True, help="the model to train: a `scaleinfer prune` output or any model "
                                                    "with the teacher's tokenizer")
    p.add_argument("--text", required=True, action="append", metavar="TEXT_FILE",
                   help="training text (repeatable); the last --holdout of each file is held out for evaluation")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (total, including resumed ones)")
    p.add_argument("--output", required=True, help="directory for the student and its trainer state")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --output")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=4, help="windows per step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=64, help="teacher tokens per position in the KL (default: "
                                                         "%(default)s)")
    g.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term; 1 - alpha weighs the "
                                                            "next-token loss (default: %(default)s)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (default: %(default)s)")
    g.add_argument("--holdout", type=float, default=0.1, help="fraction of each text held out (default: "
                                                              "%(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    g.add_argument("--freeze-embeddings", action="store_true",
                   help="train the decoder layers and final norm only; keep the token embedding and LM head (less "
                        "memory and time for large-vocabulary students)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where teacher and student run "
                                                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="also print the run's summary as one JSON line")
    p.set_defaults(fn=cmd_distill)
