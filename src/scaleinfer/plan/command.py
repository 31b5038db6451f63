"""`scaleinfer plan`: its arguments, the model argument resolved to a shape (a named shape, an HF
config.json, a catalog name or a .gguf: its header only, nothing is loaded), and the printed plan.

On the CLI's layer (it reads GGUF headers through weights/); the arithmetic below it is pure Python.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from scaleinfer.errors import ConfigError
from scaleinfer.plan.cost import Workload
from scaleinfer.plan.devices import parse_devices
from scaleinfer.plan.report import format_plan, to_json
from scaleinfer.plan.search import plan
from scaleinfer.plan.shapes import KV_FORMATS, NAMED_SHAPES, WEIGHT_FORMATS, ModelShape, from_hf_config, \
    from_model_config, named_shape

QUANTIZATIONS = ("none", "fp8", "int8", "w8a8", "int4", "w4a8", "awq")
INT8_COMPUTE = ("w8a8", "w4a8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    shapes = ", ".join(s.name for s in NAMED_SHAPES.values())
    p.add_argument("--model", required=True, help=f"a named shape ({shapes}), an HF config.json (or its "
                                                  f"directory), a catalog name or a .gguf file")
    p.add_argument("--devices", required=True, help="[N x]NAME[:key=value,...]: 8xH100, 2xH200, 4xA100-80GB, "
                                                    "L4, cpu, cpu:ranks=2, cpu:cores=16,bw=200,mem=128")
    for name in ("tp", "pp", "dp"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"fix the {name} size (default: every divisor)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence in the KV cache (default 4096)")
    p.add_argument("--batch", type=int, default=None, help="sequences per replica (default: the largest that "
                                                           "fits within --max-batch and --max-tpot-ms)")
    p.add_argument("--max-batch", type=int, default=256, help="batch cap per replica (vLLM's max_num_seqs: 256)")
    p.add_argument("--max-tpot-ms", type=float, default=50.0, help="latency bound per output token (default 50; "
                                                                   "0: none)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="weights and activations (default: bf16 on GPUs, fp32 on CPUs)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="weight format (default none)")
    p.add_argument("--kv-cache-dtype", choices=("auto", *KV_FORMATS), default="auto",
                   help="auto: the dtype on GPUs, fp16 on CPUs (as the engine does)")
    p.add_argument("--bw-efficiency", type=float, default=0.8, help="share of peak bandwidth decode reaches")
    p.add_argument("--mfu", type=float, default=0.5, help="share of peak FLOP/s prefill reaches")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per step (max_num_batched_tokens)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def resolve_shape(model: str) -> ModelShape:
    shape = named_shape(model)
    if shape is not None:
        return shape
    if model.endswith(".json") or os.path.isfile(os.path.join(model, "config.json")):
        return from_hf_config(model if model.endswith(".json") else os.path.join(model, "config.json"))
    from scaleinfer import catalog

    if catalog.is_catalog_name(model) or model.endswith(".gguf"):
        from scaleinfer.weights import gguf
        from scaleinfer.weights.gguf_file import GGUFFile

        path = catalog.resolve(model, auto_pull=False) if catalog.is_catalog_name(model) else model
        shape = from_model_config(gguf.read_model_config(GGUFFile.open(path)))
        return dataclasses.replace(shape, name=model) if catalog.is_catalog_name(model) else shape
    known = ", ".join([s.name for s in NAMED_SHAPES.values()] + catalog.names())
    raise ConfigError(f"--model {model!r} is not a named shape, a config.json, a catalog name or a .gguf; "
                      f"known names: {known}")


def workload(args, default_dtype: str) -> Workload:
    for name in ("context", "max_batch", "chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    if not (0 < args.bw_efficiency <= 1 and 0 < args.mfu <= 1):
        raise ConfigError("--bw-efficiency and --mfu must be in (0, 1]")
    dtype = args.dtype or default_dtype
    weights = WEIGHT_FORMATS[dtype if args.quantization == "none" else args.quantization]
    kv = args.kv_cache_dtype
    if kv == "auto":
        kv = "fp16" if default_dtype == "fp32" else dtype
    compute = "int8" if args.quantization in INT8_COMPUTE else "fp8" if args.quantization == "fp8" else dtype
    return Workload(context=args.context, weights=weights, kv_format=kv, act_dtype=dtype, compute_dtype=compute,
                    batch=args.batch, max_batch=args.max_batch, chunk=args.chunk, bw_efficiency=args.bw_efficiency,
                    mfu=args.mfu, max_tpot=args.max_tpot_ms / 1e3 if args.max_tpot_ms > 0 else None)


def main(args) -> int:
    shape = resolve_shape(args.model)
    cluster = parse_devices(args.devices)
    result = plan(shape, cluster, workload(args, cluster.device.default_dtype), args.tp, args.pp, args.dp)
    print(json.dumps(to_json(result), indent=2) if args.json else format_plan(result))
    return 0 if result.best is not None else 1
