"""`scaleinfer prune`: structured pruning into a smaller dense HF checkpoint (layers, FFN channels, heads).

Structured = whole rows / columns go, so the result is a plain smaller model that every dense kernel
runs faster (no sparse kernel needed). Every layer keeps the same width (an HF config has one
intermediate_size and one head count), so the per-layer choice is *which* channels / heads, by score.

Steps: resolve the target into a PrunePlan (how many layers, channels, heads); score the layers on the
calibration text (importance.layer_influence) and drop the least influential; score FFN channels and
heads on the shallower model (importance.width_importance) and keep the best in each layer; write an HF
directory (checkpoints.write_hf_dir) with compress.json recording what was removed and the scores.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass

import torch

from scaleinfer.compress import importance
from scaleinfer.compress.checkpoints import (Source, build_hf_model, count_params, open_source, prepare_output,
                                             write_hf_dir)
from scaleinfer.config import ModelConfig
from scaleinfer.errors import ConfigError

logger = logging.getLogger(__name__)

FFN_ALIGN = 32
"""Kept FFN widths are multiples of this (dense kernels like round shapes) when the model is that wide."""


@dataclass(frozen=True)
class PruneTarget:
    """What to keep; None = decide (from `params`) or keep everything."""

    layers: int | None = None
    """Decoder layers kept."""
    ffn: float | None = None
    """Fraction of FFN channels kept (0, 1]."""
    heads: int | None = None
    """Query heads kept per layer."""
    kv_heads: int | None = None
    """KV heads (GQA groups) kept per layer."""
    params: float | None = None
    """Fraction of all parameters kept (0, 1]; fills in whichever of layers / ffn is not given."""


@dataclass(frozen=True)
class PrunePlan:
    layers: int
    intermediate_size: int
    heads: int
    kv_heads: int


def param_count(c: ModelConfig, layers: int, inter: int, heads: int, kv: int) -> int:
    """Parameters of a Llama / Qwen2 shape (tied LM head counted once)."""
    h, d = c.hidden_size, c.head_dim
    embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h
    attn = h * d * (2 * heads + 2 * kv) + (d * (heads + 2 * kv) if c.attention_bias else 0)
    return embed + layers * (attn + 3 * h * inter + 2 * h)


def _align(c: ModelConfig, fraction: float) -> int:
    align = FFN_ALIGN if c.intermediate_size >= 8 * FFN_ALIGN else 1
    return max(align, int(round(c.intermediate_size * fraction / align)) * align)


def resolve_plan(c: ModelConfig, t: PruneTarget) -> PrunePlan:
    """Check the target against the model and turn it into counts; one-line ConfigErrors for people."""
    kv = _resolve_kv(c, t)
    heads = t.heads if t.heads is not None else kv * (c.num_heads // c.num_kv_heads)
    if not 0 < heads <= c.num_heads or heads % kv or heads // kv > c.num_heads // c.num_kv_heads:
        raise ConfigError(f"--heads {heads}: query heads are kept in equal numbers per kept KV head ({kv} kept, "
                          f"at most {c.num_heads // c.num_kv_heads} each); pass a multiple of --kv-heads")
    if t.layers is not None and not 1 <= t.layers <= c.num_layers:
        raise ConfigError(f"--layers {t.layers}: the model has {c.num_layers} layers; keep 1..{c.num_layers}")
    if t.ffn is not None and not 0 < t.ffn <= 1:
        raise ConfigError(f"--ffn {t.ffn}: give the fraction of FFN channels to keep, in (0, 1]")
    if t.params is None:
        inter = _align(c, t.ffn) if t.ffn is not None else c.intermediate_size
        return PrunePlan(t.layers or c.num_layers, inter, heads, kv)
    if not 0 < t.params <= 1:
        raise ConfigError(f"--params {t.params}: give the fraction of parameters to keep, in (0, 1]")
    if t.layers is not None and t.ffn is not None:
        raise ConfigError("--params with both --layers and --ffn is over-determined; drop one of the three")
    return _solve_params(c, t, heads, kv)


def _resolve_kv(c: ModelConfig, t: PruneTarget) -> int:
    """KV heads kept: --kv-heads, else all of them (or as many as --heads can be spread evenly over)."""
    if t.kv_heads is None:
        return c.num_kv_heads if t.heads is None else math.gcd(t.heads, c.num_kv_heads)
    if not 1 <= t.kv_heads <= c.num_kv_heads:
        raise ConfigError(f"--kv-heads {t.kv_heads}: the model has {c.num_kv_heads} KV heads; keep "
                          f"1..{c.num_kv_heads}")
    return t.kv_heads


def _solve_params(c: ModelConfig, t: PruneTarget, heads: int, kv: int) -> PrunePlan:
    """The plan closest to `t.params` of the parameters. With neither layers nor ffn given, both shrink by
    the same factor x (layers = round(x L), channels = x I): depth and width share the cut."""
    total = param_count(c, c.num_layers, c.intermediate_size, c.num_heads, c.num_kv_heads)
    goal = t.params * total
    best: tuple[float, PrunePlan] | None = None
    for step in range(1, 1001):
        x = step / 1000
        layers = t.layers if t.layers is not None else max(1, round(x * c.num_layers))
        inter = _align(c, t.ffn if t.ffn is not None else x)
        plan = PrunePlan(layers, min(inter, c.intermediate_size), heads, kv)
        err = abs(param_count(c, plan.layers, plan.intermediate_size, heads, kv) - goal)
        if best is None or err < best[0]:
            best = (err, plan)
    plan = best[1]
    kept = param_count(c, plan.layers, plan.intermediate_size, heads, kv) / total
    if abs(kept - t.params) > 0.05:
        raise ConfigError(f"--params {t.params}: the closest this model gets with the other targets is "
                          f"{kept:.3f}; relax --layers / --ffn / --heads")
    return plan


# ---- surgery on HF-named tensors ---------------------------------------------------------------------
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def drop_layers(state: dict[str, torch.Tensor], hf_config: dict, keep: list[int]) -> tuple[dict, dict]:
    """Keep decoder layers `keep` (in order), renumbered 0..len(keep)-1."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = t
        elif int(m.group(1)) in new_index:
            out[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = t
    cfg = {**hf_config, "num_hidden_layers": len(keep)}
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], len(keep))
    return out, cfg


def _rows(head_ids: list[int], d: int) -> torch.Tensor:
    return torch.tensor([h * d + i for h in head_ids for i in range(d)], dtype=torch.long)


def shrink_width(state: dict[str, torch.Tensor], hf_config: dict, head_dim: int, ffn_keep: list[list[int]],
                 head_keep: list[tuple[list[int], list[int]]]) -> tuple[dict, dict]:
    """Keep FFN channels ffn_keep[l] and (query heads, KV heads) head_keep[l] of every layer l."""
    out = dict(state)
    for i, (channels, (q, kv)) in enumerate(zip(ffn_keep, head_keep)):
        p = f"model.layers.{i}."
        ch = torch.tensor(channels, dtype=torch.long)
        for proj in ("gate_proj", "up_proj"):
            out[p + f"mlp.{proj}.weight"] = state[p + f"mlp.{proj}.weight"][ch]
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch]
        qr, kvr = _rows(q, head_dim), _rows(kv, head_dim)
        for proj, rows in (("q_proj", qr), ("k_proj", kvr), ("v_proj", kvr)):
            for kind in ("weight", "bias"):
                if p + f"self_attn.{proj}.{kind}" in state:
                    out[p + f"self_attn.{proj}.{kind}"] = state[p + f"self_attn.{proj}.{kind}"][rows]
        out[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, qr]
    cfg = {**hf_config, "intermediate_size": len(ffn_keep[0]), "num_attention_heads": len(head_keep[0][0]),
           "num_key_value_heads": len(head_keep[0][1]), "head_dim": head_dim}
    return {k: v.contiguous() for k, v in out.items()}, cfg


# ---- the workflow ------------------------------------------------------------------------------------
def read_calibration(path: str, tokenizer, window: int, max_windows: int) -> list[list[int]]:
    from scaleinfer.quantization.gptq import calibration_file_windows

    return calibration_file_windows(tokenizer, path, window=window, max_windows=max_windows)


def prune(src: Source, windows: list[list[int]], plan: PrunePlan) -> tuple[dict, dict, dict]:
    """Prune `src` to `plan` using `windows` for the scores: (state, hf_config, report)."""
    c = src.config
    state, cfg = src.state, src.hf_config
    report: dict = {"plan": asdict(plan)}
    if plan.layers < c.num_layers:
        bi = importance.layer_influence(build_hf_model(cfg, state), windows)
        keep = importance.keep_top(torch.tensor(bi), plan.layers)
        report.update(layer_influence=bi, layers_kept=keep,
                      layers_removed=[i for i in range(c.num_layers) if i not in keep])
        state, cfg = drop_layers(state, cfg, keep)
    if plan.intermediate_size < c.intermediate_size or plan.heads < c.num_heads or plan.kv_heads < c.num_kv_heads:
        scores = importance.width_importance(build_hf_model(cfg, state), windows, c.head_dim)
        ffn_keep = [importance.keep_top(s, plan.intermediate_size) for s in scores.ffn]
        head_keep = [importance.keep_heads(s, c.num_kv_heads, plan.kv_heads, plan.heads) for s in scores.heads]
        report.update(heads_kept=[q for q, _ in head_keep], kv_heads_kept=[kv for _, kv in head_keep],
                      ffn_importance_kept_share=[float(s[k].sum() / s.sum()) for s, k in zip(scores.ffn, ffn_keep)])
        state, cfg = shrink_width(state, cfg, c.head_dim, ffn_keep, head_keep)
    return state, cfg, report


def prune_to_dir(model: str, calibration: str, target: PruneTarget, output: str, *, window: int = 256,
                 max_windows: int = 16, save_dtype: str = "float32", overwrite: bool = False) -> dict:
    """`scaleinfer prune`: open `model`, prune it to `target` scored on `calibration`, write `output`."""
    prepare_output(output, overwrite)
    start = time.perf_counter()
    src = open_source(model)
    plan = resolve_plan(src.config, target)
    windows = read_calibration(calibration, src.ckpt.tokenizer, window, max_windows)
    before = count_params(src.state)
    state, cfg, report = prune(src, windows, plan)
    report = {"source": model, "calibration": calibration, "calibration_tokens": sum(map(len, windows)),
              "target": asdict(target), "params_before": before, "params_after": count_params(state),
              "seconds": round(time.perf_counter() - start, 1), **report}
    write_hf_dir(output, cfg, state, src, save_dtype, extra={"prune": report})
    logger.info("pruned %s to %s: %d -> %d params", model, output, before, report["params_after"])
    return report
