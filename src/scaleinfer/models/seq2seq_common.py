"""Pieces the text-to-text encoder-decoders (models/t5.py, models/bart.py) share: activations by their HF
names, padding a batch of source-id tensors for the encoder, and the encoder-input check."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scaleinfer.errors import RequestError, UnsupportedModelError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu_new": _gelu_tanh,
               "gelu_pytorch_tanh": _gelu_tanh, "tanh": torch.tanh}


def activation(name: str, cfg_file: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(f"activation {name!r} in {cfg_file} is not supported; supported: "
                                    f"{', '.join(sorted(ACTIVATIONS))}") from None


def check_source_ids(encoder_input: object, vocab_size: int, max_len: int | None) -> int:
    """The number of source tokens of a text encoder's input (1-D int64 ids in the vocabulary)."""
    if not isinstance(encoder_input, torch.Tensor) or encoder_input.dim() != 1 or encoder_input.is_floating_point():
        got = tuple(encoder_input.shape) if isinstance(encoder_input, torch.Tensor) else type(encoder_input).__name__
        raise RequestError(f"a text-to-text model's encoder input is a 1-D tensor of token ids, got {got}")
    n = encoder_input.numel()
    if n == 0:
        raise RequestError("the source text is empty; send at least one token")
    if max_len is not None and n > max_len:
        raise RequestError(f"the source has {n} tokens but the encoder takes at most {max_len}; shorten it")
    lo, hi = int(encoder_input.min()), int(encoder_input.max())
    if lo < 0 or hi >= vocab_size:
        raise RequestError(f"source token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})")
    return n


def pad_batch(inputs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, t] ids padded with pad_id, and the [b, t] bool mask of real tokens."""
    t = max(x.numel() for x in inputs)
    ids = torch.full((len(inputs), t), pad_id, dtype=torch.long, device=inputs[0].device)
    mask = torch.zeros((len(inputs), t), dtype=torch.bool, device=inputs[0].device)
    for i, x in enumerate(inputs):
        ids[i, :x.numel()] = x
        mask[i, :x.numel()] = True
    return ids, mask


def flatten_real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, t, d] states -> [sum of real lengths, d], request by request (what encode() returns)."""
    return x[mask]


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """Marian's positions (HF MarianSinusoidalPositionalEmbedding): sin features first, cos second,
    angle pos / 10000 ** (2 * (j // 2) / dim), computed in float64."""
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    half = math.ceil(dim / 2)
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, :half] = torch.sin(angle[:, 0::2])
    out[:, half:] = torch.cos(angle[:, 1::2])
    return out.float()
