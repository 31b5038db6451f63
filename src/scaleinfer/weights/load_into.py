"""The one weight loader: HF-named checkpoint tensors -> a model's (fused) parameters, driven by its family.

The family's entry (models/registry.py) says which checkpoint projections are shards of a fused module
(q/k/v -> qkv_proj), which tensors to skip or rename, and what its norms add to the stored weight. A
checkpoint name is the module path with a leading "model." (lm_head sits at the root in both). A tied LM
head is the embedding and takes no tensor of its own. Every parameter of the model (every shard of a fused
one) must arrive exactly once, or loading stops with a one-line WeightLoadError naming the tensors.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from scaleinfer.errors import WeightLoadError
from scaleinfer.layers.linear import Linear
from scaleinfer.models.registry import Family


class Placement(NamedTuple):
    """Where a checkpoint tensor went: module path, parameter name, shard of a fused module (None: whole)."""

    module: str
    param: str
    shard: int | None


def _place(name: str, family: Family) -> Placement:
    """The module path, parameter and shard of an HF checkpoint name."""
    module_path, _, param = name.removeprefix("model.").rpartition(".")
    owner, _, leaf = module_path.rpartition(".")
    if leaf in family.packed:
        fused, shard = family.packed[leaf]
        return Placement(f"{owner}.{fused}" if owner else fused, param, shard)
    return Placement(module_path, param, None)


def _checkpoint_name(place: Placement, family: Family) -> str:
    """Inverse of _place: the checkpoint name that fills `place`."""
    owner, _, leaf = place.module.rpartition(".")
    if place.shard is not None:
        leaf = next(proj for proj, target in family.packed.items() if target == (leaf, place.shard))
    path = f"{owner}.{leaf}" if owner else leaf
    return f"{path}.{place.param}" if path == "lm_head" else f"model.{path}.{place.param}"


def _copy(module: nn.Module, place: Placement, name: str, tensor, offset: float) -> None:
    if isinstance(module, Linear):
        try:
            module.load_shard(place.shard, place.param, tensor)
        except (KeyError, ValueError) as exc:
            raise WeightLoadError(f"checkpoint tensor {name}: {exc.args[0]}") from None
        return
    target = dict(module.named_parameters(recurse=False)).get(place.param) if place.shard is None else None
    if target is None:
        raise WeightLoadError(f"checkpoint tensor {name!r} has no place in the model; is the checkpoint of "
                              f"another architecture?")
    if tuple(tensor.shape) != tuple(target.shape):
        raise WeightLoadError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(target.shape)}")
    target.data.copy_(tensor.float() + offset if offset else tensor)


def _expected(model: nn.Module, family: Family, tied: bool) -> set[Placement]:
    """Every slot a checkpoint must fill: each parameter, each shard of a fused linear."""
    modules = dict(model.named_modules())
    fused = {target for target, _ in family.packed.values()}
    slots = set()
    for full_name, _ in model.named_parameters():   # a tied LM head is listed once, as the embedding
        module_path, _, param = full_name.rpartition(".")
        if tied and module_path == "lm_head":
            continue
        module = modules[module_path]
        if module_path.rpartition(".")[2] in fused and param in ("weight", "bias"):
            slots |= {Placement(module_path, param, s) for s in range(len(module.shard_bounds()))}
        else:
            slots.add(Placement(module_path, param, None))
    return slots


def load_into(model: nn.Module, family: Family, weights: Iterable[tuple[str, torch.Tensor]],
              tie_word_embeddings: bool, source: str = "checkpoint") -> dict[str, Placement]:
    """Copy HF-named checkpoint tensors (float, or packed where the checkpoint hands them over packed)
    into `model` of `family`; returns each loaded checkpoint name with its placement. `source` names the
    checkpoint in errors."""
    modules = dict(model.named_modules())
    placed: dict[str, Placement] = {}
    for raw_name, tensor in weights:
        name = family.checkpoint_name(raw_name)
        if name is None or (name == "lm_head.weight" and tie_word_embeddings):
            continue
        place = _place(name, family)
        module = modules.get(place.module)
        if module is None:
            raise WeightLoadError(f"{source}: tensor {raw_name!r} has no place in {type(model).__name__}; is the "
                                  f"checkpoint of another architecture?")
        offset = family.norm_offset if place.module.rpartition(".")[2].endswith("norm") else 0.0
        _copy(module, place, raw_name, tensor, offset)
        placed[name] = place
    missing = _expected(model, family, tie_word_embeddings) - set(placed.values())
    if missing:
        names = sorted(_checkpoint_name(p, family) for p in missing)
        raise WeightLoadError(f"{source} lacks tensors: {', '.join(names[:5])}"
                              + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
    return placed


def linear_types(placed: dict[str, Placement], stored_types: dict[str, str],
                 tie_word_embeddings: bool) -> dict[str, dict[int, str]]:
    """Module name -> shard -> stored type of each linear weight (`--quantization auto`), from load_into's
    placements and the checkpoint's stored types; a tied LM head is stored as the embedding."""
    out: dict[str, dict[int, str]] = {}
    for name, place in placed.items():
        if place.param == "weight" and name in stored_types:
            out.setdefault(place.module, {})[place.shard or 0] = stored_types[name]
    embedding = stored_types.get("model.embed_tokens.weight")
    if tie_word_embeddings and embedding is not None:
        out["lm_head"] = {0: embedding}
    return out
