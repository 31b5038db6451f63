"""Pipeline parallelism applied to a model from outside: which contiguous layers a stage holds, the
checkpoint tensors it loads, and the model cut down to them.

    stage 0      the embedding and layers [0, n0)
    stage s      layers [n_{s-1}, n_s)
    last stage   its layers, the final norm and the LM head (a tied head keeps the embedding's weight)

The split balances each stage's work, not its layer count: the last stage also runs the LM head, which
costs as much as several layers (Qwen2.5-1.5B: vocab x hidden = 233M weights, 5 layers' worth; measured
~5x one layer's matmuls on a decode step), so counting layers alone leaves the first stage idle about a
quarter of every step. A stage's cost is its weights read per decode token (the layers' projections, the
head's vocab x hidden); the boundaries fall where the running cost crosses s/size of the total, each stage
holding at least one layer. `--pipeline-layer-partition 16,12` (vLLM's VLLM_PP_LAYER_PARTITION) sets the
split by hand.
Before loading, `prepare_stage` swaps every module another stage holds for a `PPMissingLayer` (no
parameters: the loader expects nothing of it) and `stage_tensors` drops their checkpoint tensors, so a
stage reads, quantizes and keeps only its own weights; checkpoint names keep their global layer index
(GGUF stored types for `--quantization auto` still match). After loading, `finish_stage` compacts the
layer list to the stage's own layers, in order: the model's forward then runs exactly them, against a KV
cache of as many layers (`stage_config`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from torch import nn

from scaleinfer.config import ModelConfig
from scaleinfer.errors import ConfigError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class PPMissingLayer(nn.Module):
    """A module held by another pipeline stage: no weights, and calling it is a bug."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module belongs to another pipeline stage")


@dataclass(frozen=True)
class PPStage:
    """Pipeline stage `rank` of `size`: decoder layers [start, stop) of `num_layers`."""

    rank: int
    size: int
    start: int
    stop: int
    num_layers: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


def head_layers(cfg: ModelConfig) -> float:
    """The LM head's cost in layers: its weights (vocab x hidden) over one layer's projections."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = h * (2 * q + 2 * kv) + 3 * h * cfg.intermediate_size
    return cfg.vocab_size * h / layer


def stage_bounds(cfg: ModelConfig, size: int, partition: tuple[int, ...] | None = None) -> list[int]:
    """The layer index where each stage starts, and the layer count last: [0, b1, ..., num_layers]."""
    n = cfg.num_layers
    if size > n:
        raise ConfigError(f"--pipeline-parallel-size {size} exceeds the model's {n} layers; use at most {n}")
    if partition is not None:
        if len(partition) != size or sum(partition) != n or min(partition) < 1:
            raise ConfigError(f"--pipeline-layer-partition {','.join(map(str, partition))}: give {size} layer "
                              f"counts, each at least 1, that sum to the model's {n} layers")
        return [sum(partition[:s]) for s in range(size + 1)]
    total = n + head_layers(cfg)
    bounds = [0]
    for s in range(1, size):
        b = int(s * total / size + 0.5)
        bounds.append(min(max(b, bounds[-1] + 1), n - (size - s)))
    return bounds + [n]


def plan_stage(cfg: ModelConfig, rank: int, size: int, partition: tuple[int, ...] | None = None) -> PPStage:
    """Stage `rank` of `size` over the model's layers, or a one-line ConfigError."""
    bounds = stage_bounds(cfg, size, partition)
    return PPStage(rank, size, bounds[rank], bounds[rank + 1], cfg.num_layers)


def stage_config(cfg: ModelConfig, stage: PPStage) -> ModelConfig:
    """The config of the stage's KV cache and runner: its own layers only."""
    types = cfg.layer_types[stage.start:stage.stop] if cfg.layer_types else cfg.layer_types   # Gemma 3's kinds
    return replace(cfg, num_layers=stage.stop - stage.start, layer_types=types)


def _kept(name: str, stage: PPStage, tied: bool) -> bool:
    match = _LAYER.match(name)
    if match is not None:
        return stage.start <= int(match.group(1)) < stage.stop
    if name.startswith("model.embed_tokens."):
        return stage.first or (stage.last and tied)   # a tied head is the embedding's weight
    if name.startswith(("model.norm.", "lm_head.")):
        return stage.last
    return True


def stage_tensors(tensors: Iterable[tuple[str, object]], stage: PPStage, tied: bool,
                  canonical=lambda name: name) -> Iterator[tuple[str, object]]:
    """The checkpoint's (name, tensor) pairs this stage loads (`canonical`: the family's name mapping)."""
    for raw, tensor in tensors:
        if _kept(canonical(raw) or raw, stage, tied):
            yield raw, tensor


def _missing(model: nn.Module, path: str) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, PPMissingLayer())


def prepare_stage(model: nn.Module, stage: PPStage, tied: bool) -> None:
    """Before loading: every module another stage holds becomes a PPMissingLayer."""
    layers = model.get_submodule("layers")
    if len(layers) != stage.num_layers:
        raise ConfigError(f"the model has {len(layers)} layers, the pipeline plan {stage.num_layers}")
    for i in range(len(layers)):
        if not stage.start <= i < stage.stop:
            layers[i] = PPMissingLayer()
    if not stage.first and not (stage.last and tied):
        _missing(model, "embed_tokens")
    if not stage.last:
        _missing(model, "norm")
        _missing(model, "lm_head")


def finish_stage(model: nn.Module, stage: PPStage) -> None:
    """After loading and quantization: the layer list holds the stage's layers only, in order; a last
    stage that is not the first keeps no embedding module (a tied head holds the weight itself)."""
    model.layers = nn.ModuleList(layer for layer in model.layers if not isinstance(layer, PPMissingLayer))
    if not stage.first:
        _missing(model, "embed_tokens")
