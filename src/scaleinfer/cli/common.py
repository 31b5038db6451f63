"""Arguments and objects every engine command shares: engine, parallel and sampling flags, the LLM they build."""
from __future__ import annotations

import argparse

from scaleinfer.config import (DEFAULT_MODEL, DISTRIBUTED_COMMUNICATORS, KV_CACHE_DTYPES, QUANTIZATION_MODES,
                               CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, format_memory)


def engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL, help="catalog name (see `scaleinfer models`), a .gguf file, "
                                                          "an HF directory or hub id (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=SchedulerConfig.max_model_len,
                   help="longest prompt + output in tokens (default: %(default)s)")
    g.add_argument("--kv-cache-memory", default=format_memory(CacheConfig.kv_cache_memory),
                   help="memory for the paged KV cache, e.g. 512MiB (default: %(default)s)")
    g.add_argument("--dtype", default=EngineConfig.dtype, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: %(default)s)")
    g.add_argument("--threads", type=int, default=EngineConfig.threads, help="CPU threads (default: all cores)")
    g.add_argument("--device", default=EngineConfig.device, help="cpu or cuda (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="most requests running at once (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
                   help="token budget of one step (default: %(default)s)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=CacheConfig.enable_prefix_caching,
                   help="reuse KV blocks of shared prompt prefixes (default: %(default)s)")
    from scaleinfer.quantization.table import cli_help

    g.add_argument("--quantization", default=EngineConfig.quantization, choices=QUANTIZATION_MODES,
                   help=cli_help() + " (default: %(default)s)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache storage (default: %(default)s): auto (CPU: float16, bfloat16 for bfloat16 "
                        "models; GPU: the model's "
                        "dtype), float32, float16, bfloat16, or int8 (per-token, per-head scales)")
    g.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="int4 modes: GPTQ-round the weights on the model's activations over this text (slower "
                        "load; `scaleinfer quantize --calibration` saves the result)")
    g.add_argument("--attention-pattern", default=None,
                   help="override every layer's attention: causal, window=W, sinks=S,window=W (bounded KV for "
                        "endless streams), window=W,global=0:64 (Longformer), block=64,local=4,stride=8")
    speculative_args(p)
    parallel_args(p)


def speculative_args(p: argparse.ArgumentParser) -> None:
    from scaleinfer.config import SPECULATIVE_METHODS, SpeculativeConfig

    g = p.add_argument_group("speculative decoding (vLLM's names)")
    g.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                   help="ngram: propose the tokens that followed the last n tokens earlier in prompt + output (no "
                        "model; pays when the output repeats the input); draft: a smaller model of the same "
                        "tokenizer (--speculative-model). Greedy outputs are unchanged, sampled ones keep the "
                        "model's distribution (default: off)")
    g.add_argument("--speculative-model", default=None,
                   help="draft model (implies --speculative-method draft), e.g. qwen2.5-coder-0.5b-instruct")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help=f"most draft tokens per step; fewer (or none) when the measured acceptance does not pay "
                        f"(default: {SpeculativeConfig.num_speculative_tokens})")


def speculative_from_args(args):
    from scaleinfer.config import speculative_config

    return speculative_config(args.speculative_method, args.speculative_model, args.num_speculative_tokens)


def parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (vLLM's names)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=ParallelConfig.tensor_parallel_size,
                   help="ranks that split every layer (Megatron-style); on one machine they are spawned here "
                        "(default: %(default)s)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=ParallelConfig.pipeline_parallel_size,
                   help="ranks that hold contiguous layer stages (default: %(default)s)")
    g.add_argument("--pipeline-layer-partition", type=_partition, default=None, metavar="N,N,...",
                   help="layers per pipeline stage, e.g. 16,12 (default: balanced by cost, the LM head counted)")
    g.add_argument("--pipeline-micro-batches", type=int, default=None, metavar="N",
                   help="steps in flight through the pipeline, each with its own requests and share of the KV "
                        "cache (default: one per stage)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=ParallelConfig.data_parallel_size,
                   help="engine replicas behind one endpoint (default: %(default)s)")
    g.add_argument("--distributed-init-method", default=None, metavar="tcp://HOST:PORT",
                   help="rank 0's address when the ranks are started by hand on several machines (with --rank "
                        "and --world-size); under torchrun its environment is used")
    g.add_argument("--rank", type=int, default=None, help="this process's rank (with --distributed-init-method)")
    g.add_argument("--world-size", type=int, default=None, help="number of ranks (with --distributed-init-method)")
    g.add_argument("--distributed-timeout", type=float, default=ParallelConfig.distributed_timeout,
                   help="seconds to wait for every rank to join, and for a peer in a collective (default: "
                        "%(default)s)")
    g.add_argument("--distributed-communicator", default=ParallelConfig.communicator,
                   choices=DISTRIBUTED_COMMUNICATORS,
                   help="tensor-parallel collectives: shm (shared memory, one host), gloo, auto (default: "
                        "%(default)s)")


def _partition(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write layer counts separated by commas, e.g. 16,12") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every stage needs at least one layer")
    return counts


def parallel_config(args) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          pipeline_layer_partition=args.pipeline_layer_partition,
                          pipeline_micro_batches=args.pipeline_micro_batches,
                          data_parallel_size=args.data_parallel_size,
                          distributed_init_method=args.distributed_init_method, rank=args.rank,
                          world_size=args.world_size, distributed_timeout=args.distributed_timeout,
                          communicator=args.distributed_communicator)


def sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def make_llm(args):
    from scaleinfer.llm import LLM

    return LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               kv_cache_memory=args.kv_cache_memory, threads=args.threads, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=args.enable_prefix_caching,
               quantization=args.quantization,
               kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
               attention_pattern=args.attention_pattern, calibration=args.calibration,
               parallel=parallel_config(args), speculative_config=speculative_from_args(args))


def is_worker_rank(args) -> bool:
    """Whether this process is a rank other than 0 of a distributed engine (torchrun's or --rank)."""
    if "tensor_parallel_size" not in vars(args):
        return False
    from scaleinfer.engine.launch import resolve_role

    from dataclasses import replace

    # Data parallel sits above the engine (serve's router, LLM's engine processes): each replica is one engine.
    role = resolve_role(replace(parallel_config(args), data_parallel_size=1))
    return role is not None and role.rank != 0


def make_params(args):
    from scaleinfer.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)
