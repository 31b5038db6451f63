"""embed | export-onnx: sentence embeddings (or classes) from an encoder model as JSON lines, and the
encoder exported to ONNX."""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_ENCODER = "all-minilm-l6-v2"


def _texts(args) -> list[str]:
    if args.texts:
        return list(args.texts)
    lines = [line.rstrip("\n") for line in sys.stdin]
    return [line for line in lines if line.strip()]


def _engine(args):
    from scaleinfer.engine.encoder_engine import EncoderEngine, resolve_encoder_path
    from scaleinfer.errors import ConfigError

    path = resolve_encoder_path(args.model)
    if path is None:
        raise ConfigError(f"{args.model!r} is not an encoder model (BERT, MiniLM, MPNet, RoBERTa); try "
                          f"--model {DEFAULT_ENCODER}")
    return EncoderEngine(path, dtype=args.dtype, threads=args.threads, name=args.model,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)


def cmd_embed(args) -> int:
    from scaleinfer.errors import ConfigError

    texts = _texts(args)
    if not texts:
        raise ConfigError("no texts: pass them as arguments or one per line on stdin")
    if args.backend == "onnxruntime":
        from scaleinfer.runner.onnx_runner import OnnxEncoder

        engine = _engine(args)
        engine.runner = OnnxEncoder.for_engine(engine, args.onnx_dir)
    else:
        engine = _engine(args)
    if args.classify:
        for i, (text, out) in enumerate(zip(texts, engine.classify(texts, args.truncate_prompt_tokens))):
            print(json.dumps({"index": i, "text": text, "label": out.outputs.label, "probs": out.outputs.probs},
                             ensure_ascii=False))
        return 0
    for i, (text, out) in enumerate(zip(texts, engine.embed(texts, args.truncate_prompt_tokens, args.dimensions))):
        print(json.dumps({"index": i, "text": text, "tokens": len(out.prompt_token_ids),
                          "embedding": [round(x, 7) for x in out.outputs.embedding]}, ensure_ascii=False))
    return 0


def cmd_export_onnx(args) -> int:
    from scaleinfer.runner.onnx_runner import export_onnx

    engine = _engine(args)
    path = export_onnx(engine, args.output, opset=args.opset)
    print(f"wrote {path} (inputs input_ids, attention_mask, token_type_ids; outputs last_hidden_state, "
          f"{'sentence_embedding' if engine.config.task == 'embed' else 'logits'})", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from scaleinfer.config import EngineConfig

    p.add_argument("--model", default=DEFAULT_ENCODER,
                   help="encoder: catalog name or HF directory (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=EngineConfig.threads, help="CPU threads (default: all cores)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="tokens per packed batch (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch (default: %(default)s)")


def register(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings of texts (arguments, or lines on stdin) as JSON lines")
    p.add_argument("texts", nargs="*", help="texts to embed (default: one per line on stdin)")
    _common(p)
    p.add_argument("--truncate-prompt-tokens", type=int, default=None,
                   help="cut longer inputs to this many tokens (-1: the model's longest); default: refuse them")
    p.add_argument("--dimensions", type=int, default=None,
                   help="Matryoshka output size (only for models trained for it)")
    p.add_argument("--classify", action="store_true", help="a classifier model: print labels and probabilities")
    p.add_argument("--backend", default="scaleinfer", choices=["scaleinfer", "onnxruntime"],
                   help="run the model ourselves, or its ONNX export through onnxruntime (default: %(default)s)")
    p.add_argument("--onnx-dir", default=None,
                   help="with --backend onnxruntime: a directory from `scaleinfer export-onnx` (default: export "
                        "into the cache once)")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("export-onnx", help="export an encoder model to ONNX (torch.onnx.export)")
    _common(p)
    p.add_argument("--output", required=True, help="directory to write model.onnx (+ tokenizer files) into")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(fn=cmd_export_onnx)
