"""Frozen configuration dataclasses for every stage; the only module that reads environment variables.

The defaults are written here once: LLM() and the CLI (cli.py) take theirs from these dataclasses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from scaleinfer.errors import ConfigError


DEFAULT_MODEL = "smollm2-135m-instruct"
"""The model used when none is named: a catalog name (catalog.py). LLM(), the CLI and EngineConfig read it here."""

QUANTIZATION_MODES = ("none", "int8", "int4", "int4-g64", "int4-g128", "w8a8", "w4a8", "auto")
"""Values of --quantization, in the order of quantization/table.py (which holds the methods and help)."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a decoder-only transformer, read once per family from its checkpoint."""

    architecture: str
    """Family name as in models/registry.py, e.g. "llama" or "qwen2"."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """HF-style rope_scaling dict (type/factor/...) or None for plain RoPE."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Q/K/V projections carry a bias (Qwen2)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    """Per layer "sliding_attention" or "full_attention" (Gemma 3); empty = every layer alike."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is query_pre_attn_scalar ** -0.5 (Gemma); None = head_dim ** -0.5."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers (Gemma 3: 10000); None = rope_theta everywhere."""
    final_logit_softcapping: float | None = None
    """Logits become cap * tanh(logits / cap) (Gemma 2/3 when set); None = no capping."""
    hidden_activation: str = "silu"
    """Activation of the gated MLP: "silu" (SwiGLU) or "gelu_pytorch_tanh" (Gemma's GeGLU)."""
    name: str = ""
    """Human-readable model name for logs and /v1/models."""
    arch_config: object | None = None
    """A family's own frozen config for what the fields above (the decoder's) do not describe, e.g. an
    encoder-decoder's encoder (models/encoder_decoder.py; models/whisper.py: WhisperConfig); else None."""


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory: int = 1 << 30
    """Bytes of memory for K and V across all layers; decides the number of blocks."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks of identical prompt prefixes across requests."""
    kv_cache_dtype: str = "auto"
    """auto (on the CPU: float16 for float32 / float16 models, bfloat16 for bfloat16 ones; elsewhere the
    model's dtype), float32, float16, bfloat16, or int8 (per-token, per-head scales: ~0.27x the bytes of fp32)."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ConfigError(f"--kv-cache-memory must be positive, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int = 512
    """Token budget of one engine step, shared by prompt chunks and decodes (chunked prefill)."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_model_len: int = 2048
    """Longest prompt + output a request may have, in tokens."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ConfigError(f"--max-model-len must be >= 2, got {self.max_model_len}")


DISTRIBUTED_COMMUNICATORS = ("auto", "shm", "gloo")


@dataclass(frozen=True)
class ParallelConfig:
    """How one engine is split over processes (vLLM's names). The ranks of one engine are
    tensor_parallel_size x pipeline_parallel_size processes; rank 0 (the driver) runs the scheduler and
    the sampler and holds a shard too. data_parallel_size counts whole engine replicas (a router's)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_init_method: str | None = None
    """tcp://HOST:PORT of rank 0 when the ranks are started by hand on several machines (with rank and
    world_size), "env://" under torchrun (read from its environment); None: this process is rank 0 and
    spawns the other ranks on this machine (a free port on 127.0.0.1)."""
    rank: int | None = None
    """This process's rank (with distributed_init_method); None: 0, or torchrun's RANK."""
    world_size: int | None = None
    """Number of ranks (with distributed_init_method); must equal the parallel sizes' product."""
    distributed_timeout: float = 120.0
    """Seconds a rank waits for the others to join, and for a peer inside a collective, before failing."""
    communicator: str = "auto"
    """Tensor-parallel collectives: shm (shared memory, ranks on one host), gloo (torch.distributed, any
    hosts), auto (shm when every rank is on this host and the kernels are built, else gloo; NCCL on GPUs)."""
    pipeline_micro_batches: int | None = None
    """Steps in flight through a pipeline (virtual engines, each with its own requests and share of the KV
    cache): None, one per stage; 1, one step at a time."""
    pipeline_layer_partition: tuple[int, ...] | None = None
    """Layers per pipeline stage, in order (vLLM's VLLM_PP_LAYER_PARTITION); None: balanced by cost, the
    last stage's LM head counted (distributed/stages.py)."""

    @property
    def num_ranks(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def steps_in_flight(self) -> int:
        """Steps a pipeline keeps in flight: pipeline_micro_batches, or one per stage."""
        return self.pipeline_micro_batches or self.pipeline_parallel_size

    @property
    def distributed(self) -> bool:
        """Whether this engine runs over several processes (or was asked to join a process group)."""
        return self.num_ranks > 1 or self.distributed_init_method is not None

    def __post_init__(self) -> None:
        for flag, value in (("--tensor-parallel-size", self.tensor_parallel_size),
                            ("--pipeline-parallel-size", self.pipeline_parallel_size),
                            ("--data-parallel-size", self.data_parallel_size)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches < 1:
            raise ConfigError(f"--pipeline-micro-batches must be >= 1, got {self.pipeline_micro_batches}")
        if self.pipeline_layer_partition is not None and len(self.pipeline_layer_partition) != \
                self.pipeline_parallel_size:
            raise ConfigError(f"--pipeline-layer-partition gives {len(self.pipeline_layer_partition)} stages, "
                              f"--pipeline-parallel-size is {self.pipeline_parallel_size}")
        if self.distributed_timeout <= 0:
            raise ConfigError(f"--distributed-timeout must be positive seconds, got {self.distributed_timeout}")
        if self.communicator not in DISTRIBUTED_COMMUNICATORS:
            raise ConfigError(f"--distributed-communicator must be one of {', '.join(DISTRIBUTED_COMMUNICATORS)}, "
                              f"got {self.communicator!r}")
        init = self.distributed_init_method
        if init is not None and not init.startswith(("tcp://", "env://")):
            raise ConfigError(f"--distributed-init-method must be tcp://HOST:PORT or env://, got {init!r}")
        if self.world_size is not None and self.world_size != self.num_ranks:
            raise ConfigError(f"--world-size {self.world_size} must equal --tensor-parallel-size x "
                              f"--pipeline-parallel-size = {self.num_ranks}")
        if self.rank is not None and not 0 <= self.rank < self.num_ranks:
            raise ConfigError(f"--rank {self.rank} must be in [0, {self.num_ranks})")


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> dict[str, str] | None:
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them, or None outside torchrun."""
    if not all(k in os.environ for k in TORCHRUN_ENV):
        return None
    return {k: os.environ[k] for k in TORCHRUN_ENV}


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's names): a proposer guesses the next tokens, the model checks them all
    in one forward pass and keeps the longest prefix its own sampling agrees with (spec_decode/)."""

    method: str | None = None
    """ngram (prompt lookup: the tokens that followed the last n tokens' previous occurrence), draft (a
    smaller model sharing the tokenizer), or None: off (draft when only `model` is given)."""
    model: str | None = None
    """The draft model (method draft): catalog name, .gguf file, HF directory or hub id."""
    num_speculative_tokens: int = 4
    """Most tokens proposed per request and step (k); adaptive k picks 0..k from the measured acceptance."""
    prompt_lookup_max: int = 4
    """ngram: longest suffix matched against the earlier tokens (tried first)."""
    prompt_lookup_min: int = 1
    """ngram: shortest suffix matched."""
    adaptive: bool = True
    """Choose k per request from its measured acceptance and the measured cost of checking a token; off
    when it does not pay. False: always propose num_speculative_tokens."""
    disable_by_batch_size: int | None = 8
    """No speculation in steps with more running requests than this (checking costs more than it saves
    once the batch keeps the cores busy); None: no limit."""
    draft_kv_cache_memory: int = 256 << 20
    """Bytes of KV cache of the draft model."""

    @property
    def enabled(self) -> bool:
        return self.method is not None

    def __post_init__(self) -> None:
        if self.method is None and self.model is not None:
            object.__setattr__(self, "method", "draft")
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"--speculative-method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                              f"got {self.method!r}")
        if self.method == "draft" and not self.model:
            raise ConfigError("--speculative-method draft needs --speculative-model (e.g. "
                              "qwen2.5-coder-0.5b-instruct for qwen2.5-coder-1.5b-instruct)")
        if self.method == "ngram" and self.model is not None:
            raise ConfigError(f"--speculative-model {self.model!r} is for --speculative-method draft, not ngram")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError(f"--num-speculative-tokens must be from 1 to 16, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be >= 1 and <= prompt_lookup_max "
                              f"({self.prompt_lookup_max})")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ConfigError(f"disable_by_batch_size must be >= 1 or None, got {self.disable_by_batch_size}")
        if self.draft_kv_cache_memory <= 0:
            raise ConfigError(f"draft_kv_cache_memory must be positive, got {self.draft_kv_cache_memory}")

    @classmethod
    def from_dict(cls, d: dict) -> "SpeculativeConfig":
        """vLLM's speculative_config dict: method, model, num_speculative_tokens, prompt_lookup_max/min, ..."""
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"speculative_config has unknown keys {unknown}; known: {sorted(names)}")
        values = dict(d)
        if values.get("method") == "draft_model":   # vLLM's spelling
            values["method"] = "draft"
        if "draft_kv_cache_memory" in values:
            values["draft_kv_cache_memory"] = parse_memory(values["draft_kv_cache_memory"], "draft_kv_cache_memory")
        return cls(**values)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built by LLM(...) or the CLI."""

    model: str = DEFAULT_MODEL
    """Catalog name, local GGUF file, local HF directory, or hub id."""
    dtype: str = "float32"
    """Compute dtype: float32 (CPU default), bfloat16 or float16."""
    device: str = "cpu"
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default (all cores)."""
    seed: int = 0
    """Seeds the sampling of requests that bring no seed of their own (as vLLM's seed): engines built with
    the same seed and given the same requests in the same order sample the same tokens."""
    quantization: str = "auto"
    """Weight quantization applied after loading: auto (each GGUF tensor as stored, in our fastest kernels:
    Q4 types as w4a8, Q5-Q8 as w8a8, float as none; HF checkpoints and GPUs: none), none, int8, int4
    (group 32; int4-g64, int4-g128), w8a8 (int8 weights and per-token int8 activations) or w4a8."""
    calibration: str | None = None
    """A text file: int4 modes round their weights with GPTQ on the model's activations over it
    (quantization/gptq.py; slower load) instead of to nearest. Use a text other than the one you evaluate on."""
    attention_pattern: str | None = None
    """Override every layer's attention pattern, e.g. "sinks=4,window=1020" for endless streams with
    bounded KV memory (see attention/patterns.py); None keeps the model's own (causal, or its windows)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                              f"got {self.quantization!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")


def speculative_config(method: str | None = None, model: str | None = None,
                       num_speculative_tokens: int | None = None,
                       config: "dict | SpeculativeConfig | None" = None) -> SpeculativeConfig:
    """SpeculativeConfig from vLLM's arguments: a speculative_config dict (or object), overridden by the
    separate method / model / k arguments where given."""
    base = config if isinstance(config, SpeculativeConfig) else SpeculativeConfig.from_dict(config or {})
    values = {}
    if method is not None:
        values["method"] = method
    if model is not None:
        values["model"] = model
    if num_speculative_tokens is not None:
        values["num_speculative_tokens"] = num_speculative_tokens
    if not values:
        return base
    from dataclasses import replace

    if "model" in values and "method" not in values and base.method is None:
        values["method"] = "draft"
    out = replace(base, **values)
    if not out.enabled:
        raise ConfigError("--num-speculative-tokens needs --speculative-method ngram or --speculative-model")
    return out


def format_memory(num_bytes: int) -> str:
    """A byte count the way parse_memory reads it back, e.g. 1 << 30 -> "1GiB" (CLI defaults)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return str(num_bytes)


def parse_memory(text: str | int, what: str = "--kv-cache-memory") -> int:
    """Parse a size such as "512MiB", "2GiB", "1.5G" or a byte count into bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
             "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):].strip()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"cannot read {what} {text!r}; write e.g. 512MiB, 2GiB or a byte count")
    return int(value * units[unit])


ALLOW_LONG_ENV = "SCALEINFER_ALLOW_LONG_MAX_MODEL_LEN"


def allow_long_max_model_len() -> bool:
    """SCALEINFER_ALLOW_LONG_MAX_MODEL_LEN=1 lets max_model_len exceed the model's positions for any
    attention pattern (cost measurements, experiments), as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN."""
    return os.environ.get(ALLOW_LONG_ENV) == "1"


def model_cache_dir() -> str:
    """Where pulled models are stored (SCALEINFER_CACHE, default ~/.cache/scaleinfer)."""
    return os.environ.get("SCALEINFER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "scaleinfer"))


API_KEY_ENV = "SCALEINFER_API_KEY"


def api_key_from_env() -> str | None:
    """SCALEINFER_API_KEY: the key `scaleinfer serve` requires when neither --api-key nor --api-key-file
    is given (an environment variable stays out of `ps`, unlike a command-line flag)."""
    return os.environ.get(API_KEY_ENV) or None
