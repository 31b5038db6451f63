"""Importance scores from calibration activations: whole layers, FFN channels, attention heads.

- Layers: ShortGPT's Block Influence (Men et al. 2024), BI_l = 1 - mean over tokens of cos(x_l, x_{l+1})
  between a decoder layer's input and output hidden states. A layer that barely turns the residual
  stream is redundant; prune the lowest.
- FFN channels: channel j of a gated MLP adds down[:, j] * a_j to the residual stream (a_j = silu(gate_j x)
  * up_j x), so its expected contribution is ||down[:, j]||_2 * sqrt(E[a_j^2]): activation magnitude
  times weight magnitude, as Wanda scores weights and LLM-Pruner's first-order term scores groups.
- Attention heads: head h adds o_proj[:, h] @ z_h (z_h its attention output); score sqrt(E||o_proj_h z_h||^2),
  measured exactly on the calibration tokens. KV groups are scored as the sum of their query heads.

The scores are gathered with forward hooks on an HF transformers Llama / Qwen2 model (checkpoints.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CALIBRATION_BATCH = 4
"""Windows per forward pass while gathering statistics."""


def _batches(windows: Sequence[Sequence[int]], size: int = CALIBRATION_BATCH):
    for i in range(0, len(windows), size):
        chunk = windows[i:i + size]
        n = min(len(w) for w in chunk)   # calibration windows are full, so equal; cut to be safe
        yield torch.tensor([list(w[:n]) for w in chunk])


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.inference_mode()
def layer_influence(model, windows: Sequence[Sequence[int]]) -> list[float]:
    """Block Influence of every decoder layer of `model` over the token `windows` (higher = more needed)."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            x, y = _hidden_in(args, kwargs).float(), _hidden_out(output).float()
            sums[i] += float((1.0 - F.cosine_similarity(x, y, dim=-1)).sum())
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = _run_hooked(model, windows, handles)
    return (sums / max(tokens, 1)).tolist()


@dataclass
class WidthScores:
    """Per decoder layer: one score per FFN channel [intermediate] and per query head [heads]."""

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]


@torch.inference_mode()
def width_importance(model, windows: Sequence[Sequence[int]], head_dim: int) -> WidthScores:
    """FFN channel and attention head scores of every decoder layer of `model` over the token `windows`."""
    layers = model.model.layers
    ffn_sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_sq = [torch.zeros(layer.self_attn.o_proj.in_features // head_dim, dtype=torch.float64) for layer in layers]

    def ffn_hook(i: int):
        def hook(module, args):
            ffn_sq[i] += args[0].double().pow(2).sum(dim=(0, 1))
        return hook

    def head_hook(i: int):
        def hook(module, args):
            z = args[0].float().reshape(-1, head_sq[i].numel(), head_dim)          # [tokens, heads, d]
            w = module.weight.float().reshape(module.out_features, -1, head_dim)   # [hidden, heads, d]
            contrib = torch.einsum("nhd,ohd->nho", z, w)                           # each head's output
            head_sq[i] += contrib.double().pow(2).sum(dim=(0, 2))
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
    tokens = _run_hooked(model, windows, handles)
    n = max(tokens, 1)
    ffn = [torch.linalg.vector_norm(layer.mlp.down_proj.weight.double(), dim=0) * (sq / n).sqrt()
           for layer, sq in zip(layers, ffn_sq)]
    heads = [(sq / n).sqrt() for sq in head_sq]
    return WidthScores(ffn=[s.float() for s in ffn], heads=[s.float() for s in heads])


def keep_heads(scores: torch.Tensor, num_kv_heads: int, keep_kv: int, keep_q: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) to keep in one layer, in their original order. GQA groups stay whole and
    equal: the `keep_kv` KV groups with the largest summed query-head scores, and in each the
    `keep_q // keep_kv` best query heads (HF's repeat_kv maps query head h to KV head h // group)."""
    group = scores.numel() // num_kv_heads
    per_group = keep_q // keep_kv
    group_scores = scores.reshape(num_kv_heads, group).sum(dim=1)
    kv = sorted(torch.topk(group_scores, keep_kv).indices.tolist())
    q = []
    for g in kv:
        best = torch.topk(scores[g * group:(g + 1) * group], per_group).indices.tolist()
        q.extend(g * group + h for h in sorted(best))
    return q, kv


def keep_top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` largest scores, in their original order."""
    return sorted(torch.topk(scores, k).indices.tolist())


def _run_hooked(model, windows: Sequence[Sequence[int]], handles: list) -> int:
    """Run `model` over the windows with its hooks in place, then remove them; the tokens seen."""
    tokens = 0
    try:
        for batch in _batches(windows):
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return tokens
