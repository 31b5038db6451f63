"""Tensor parallelism applied to a model from outside (Megatron-style): which part of every checkpoint
tensor a rank holds, the model config of one shard, and the collectives installed after loading.

    q, k, v, gate, up, embedding, LM head   column-parallel: a band of output rows each
    o, down                                 row-parallel: a band of input columns, then one all-reduce
    norms, biases of o / down, the rest     replicated (a row-parallel bias is added on rank 0 only)

Heads are split whole; KV heads too, or replicated when there are fewer KV heads than ranks (each rank
keeps the KV head its query heads read; Gemma 3 270M has one). The intermediate rows are split along
whole groups of 32 (the int4 / w4a8 / Q4 block: GGUF Q4_K arrives in our group-32 layout, so its
super-blocks need not stay whole), the vocabulary in near-equal bands. A rank's model is built from
`shard_config` (fewer heads, intermediate rows, vocabulary) and loaded through `shard_tensors`, so every
quantization mode then quantizes its own shard exactly as it would the whole (identical int4 groups and
per-32 activation blocks; w8a8's per-token activation scale of o / down is taken over the shard's columns)
and the KV cache (int8 key scales included) holds the rank's KV heads only. After quantization
`install_tensor_parallel` puts layers/parallel.py's wrappers on o, down, the embedding and the head.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from scaleinfer.config import ModelConfig
from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear
from scaleinfer.layers.parallel import GatherLogits, RowParallel, VocabParallelEmbedding, group_max

GROUP = 32
"""Intermediate and head bands are cut at multiples of this many columns (int4 groups stay whole)."""


@dataclass(frozen=True)
class TPShard:
    """What rank `rank` of `size` holds; bands are [start, stop) in heads, rows or vocabulary ids."""

    rank: int
    size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_sizes: tuple[int, ...]
    """Vocabulary rows of every rank, in rank order."""


def _band(total: int, parts: int, index: int, unit: int = 1) -> tuple[int, int]:
    """Band `index` of `total` split into `parts` near-equal bands of whole units."""
    units = total // unit
    return (index * units // parts * unit, (index + 1) * units // parts * unit)


def plan_shard(cfg: ModelConfig, rank: int, size: int) -> TPShard:
    """The shard of rank `rank` of a tensor-parallel group of `size`, or a one-line ConfigError."""
    h, h_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if h % size:
        raise ConfigError(f"--tensor-parallel-size {size} must divide the model's {h} attention heads")
    if h_kv % size and size % h_kv:
        raise ConfigError(f"--tensor-parallel-size {size} must divide the model's {h_kv} KV heads or be a "
                          f"multiple of them")
    if (h // size * d) % GROUP or cfg.intermediate_size % GROUP:
        raise ConfigError(f"tensor parallelism needs head bands and intermediate rows in multiples of {GROUP}")
    heads = _band(h, size, rank)
    kv = _band(h_kv, size, rank) if h_kv >= size else (rank * h_kv // size, rank * h_kv // size + 1)
    inter = _band(cfg.intermediate_size, size, rank, GROUP)
    vocab_bands = [_band(cfg.vocab_size, size, r) for r in range(size)]
    return TPShard(rank, size, heads, kv, inter, vocab_bands[rank], tuple(b - a for a, b in vocab_bands))


def shard_config(cfg: ModelConfig, shard: TPShard) -> ModelConfig:
    """The config a rank builds its model from: its heads, KV heads, intermediate rows and vocabulary."""
    return replace(cfg, num_heads=shard.heads[1] - shard.heads[0], num_kv_heads=shard.kv_heads[1] - shard.kv_heads[0],
                   intermediate_size=shard.intermediate[1] - shard.intermediate[0],
                   vocab_size=shard.vocab[1] - shard.vocab[0])


def _rule(name: str, shard: TPShard, d: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the checkpoint tensor `name` this rank keeps; None: all of it."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    leaf, param = parts[-2], parts[-1]
    rows = {"q_proj": (shard.heads[0] * d, shard.heads[1] * d),
            "k_proj": (shard.kv_heads[0] * d, shard.kv_heads[1] * d),
            "v_proj": (shard.kv_heads[0] * d, shard.kv_heads[1] * d),
            "gate_proj": shard.intermediate, "up_proj": shard.intermediate,
            "embed_tokens": shard.vocab, "lm_head": shard.vocab}
    cols = {"o_proj": (shard.heads[0] * d, shard.heads[1] * d), "down_proj": shard.intermediate}
    if leaf in rows:
        return (0, *rows[leaf])
    if leaf in cols and param == "weight":
        return (1, *cols[leaf])
    return None


def slice_tensor(tensor, dim: int, start: int, stop: int):
    """`tensor` narrowed to [start, stop) along `dim`: a float tensor, or a PackedInt4 (int4 group 32,
    quantization/int4.py) whose columns are cut along whole groups."""
    if isinstance(tensor, torch.Tensor):
        return tensor.narrow(dim, start, stop - start).contiguous()
    from scaleinfer.quantization.int4 import PackedInt4

    if not isinstance(tensor, PackedInt4):
        raise ConfigError(f"tensor parallelism cannot split a {type(tensor).__name__} weight")
    if dim == 0:
        return PackedInt4(tensor.qweight[start:stop].contiguous(), tensor.scale[start:stop].contiguous(),
                          tensor.min[start:stop].contiguous())
    assert start % GROUP == 0 and stop % GROUP == 0, "int4 columns are cut along whole groups"
    g0, g1 = start // GROUP, stop // GROUP
    return PackedInt4(tensor.qweight[:, start // 2:stop // 2].contiguous(), tensor.scale[:, g0:g1].contiguous(),
                      tensor.min[:, g0:g1].contiguous())


def shard_tensors(tensors: Iterable[tuple[str, object]], shard: TPShard, cfg: ModelConfig,
                  canonical=lambda name: name) -> Iterator[tuple[str, object]]:
    """The checkpoint's (name, tensor) pairs cut to this rank's shard (`canonical`: the family's
    checkpoint-name mapping, for checkpoints that prefix their names)."""
    for raw, tensor in tensors:
        name = canonical(raw) or raw
        rule = _rule(name, shard, cfg.head_dim)
        if rule is not None:
            tensor = slice_tensor(tensor, *rule)
        elif name.endswith(("o_proj.bias", "down_proj.bias")) and shard.rank != 0:
            tensor = torch.zeros_like(tensor)   # a row-parallel bias is added once, after the sum
        yield raw, tensor


def share_row_amax(model: nn.Module, comm) -> None:
    """Before quantizing: each dense row-parallel linear (o, down) gets `row_amax`, its rows' largest |w| over
    the whole row (every rank's columns), so per-channel int8 methods round each rank's columns on the
    scale one process would use (quantization/int8.py), not on a scale of their own."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.rpartition(".")[2] in ("o_proj", "down_proj") \
                and module.weight is not None and not module.packed_shards:
            module.row_amax = group_max(comm, module.weight.detach().abs().amax(dim=1))


def install_tensor_parallel(model: nn.Module, shard: TPShard, comm) -> None:
    """After loading and quantization: all-reduce after o / down, a vocabulary-parallel embedding and a
    gathered LM head."""
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if isinstance(module, Linear) and leaf in ("o_proj", "down_proj"):
            module.quant_method = RowParallel(module.quant_method, comm)
        elif isinstance(module, Linear) and leaf == "lm_head":
            module.quant_method = GatherLogits(module.quant_method, comm, list(shard.vocab_sizes))
        elif isinstance(module, nn.Embedding):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(owner, leaf, VocabParallelEmbedding(module.weight, shard.vocab[0], comm))
