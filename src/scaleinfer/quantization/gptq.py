"""Calibrated int4 rounding (GPTQ, Frantar et al. 2022): same packed layout and kernels as round-to-nearest.

Round-to-nearest picks each 4-bit value on its own. GPTQ rounds the input columns of a weight one at a
time and pushes each column's rounding error onto the columns not yet rounded, weighted by how the
layer's inputs co-vary: it minimises ||X W^T - X Q^T|| over calibration inputs X, not ||W - Q||. The
statistic it needs per linear is H = X^T X / n over the calibration tokens, collected here by running
the model over windows of a calibration text, layer by layer (`gptq_quantize_model`). Rows are
independent given H, so a fused QKV or gate/up layer is rounded shard by shard with one H.

The result is ordinary int4 group-wise weights (q in [0, 15], scale and min per group from the group's
min/max), so `scaleinfer quantize --calibration FILE` writes a checkpoint that loads and runs exactly
like an uncalibrated one. The calibration text must not be the evaluation text (the README's numbers
calibrate Qwen on the English file and score the Chinese one). Qwen2.5-0.5B on hongloumeng (v at int8,
quantization/mixed.py): +5.5% perplexity rounding to nearest, +2.4% with this (README, Compression).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear

logger = logging.getLogger(__name__)

DAMP = 0.1
"""Fraction of the mean diagonal of H added to its diagonal: keeps the Cholesky factor well conditioned and
trusts the calibration text's correlations less. Qwen2.5-0.5B, first 12 hongloumeng windows, Shakespeare
calibration (32 windows): 0.01 -> +6.9%, 0.1 -> +5.5%, 0.2 -> +5.7%, 0.4 -> +4.6% (16 windows at 0.1: +4.7%):
a few tenths either way are the calibration text's luck; 0.1 is the usual choice for small calibration sets."""
BLOCK = 128
"""Columns rounded per block before the lazy update of the remaining columns (a multiple of the group)."""


def calibration_windows(tokenizer, text: str, window: int = 512, max_windows: int = 32) -> list[list[int]]:
    """Token windows of `text` for calibration: non-overlapping, full windows only (at most `max_windows`)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
    size = window - len(bos)
    out = [bos + ids[i:i + size] for i in range(0, len(ids) - size + 1, size)][:max_windows]
    if not out:
        raise ValueError(f"the calibration text has {len(ids)} tokens; it needs at least {size} (one window)")
    return out


def calibration_file_windows(tokenizer, path: str, window: int = 512, max_windows: int = 32) -> list[list[int]]:
    """calibration_windows of the UTF-8 text file `path`; ConfigError (one line) when it cannot be read or
    is too short."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the calibration text {path!r}: {exc}") from None
    try:
        return calibration_windows(tokenizer, text, window=window, max_windows=max_windows)
    except ValueError as exc:
        raise ConfigError(f"--calibration {path}: {exc}") from None


def decoder_linears(model) -> dict[str, Linear]:
    """The Linear layers GPTQ rounds: every one but the LM head (which int4 modes keep at 8 bits)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Linear) and name.rpartition(".")[2] != "lm_head"}


def _cloned(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@torch.inference_mode()
def gptq_quantize_model(model, run_window: Callable[[list[int]], object], windows: list[list[int]], group_size: int,
                        half_scales: bool) -> None:
    """GPTQ-round every decoder linear of `model` (freshly loaded, dense) over the token `windows`, one decoder
    layer after another: layer l's statistics come from inputs that went through the already rounded
    layers 0 .. l-1 (so later layers compensate the earlier ones' errors), as in the GPTQ paper.

    Results are left as packed shards (`Linear.packed_shards`, int4.PackedInt4), which the int4 methods
    adopt as stored, like a GGUF Q4 tensor. Shards that arrived packed (exact GGUF Q4_0/Q4_1/Q4_K) are kept
    as they are; shards the int4 modes keep at int8 (mixed.int8_shards: attention v) are left dense, and
    the later layers' statistics see them unrounded (int8 rounding is ~16x finer than int4's). `run_window(ids)` runs the model's forward over one window (the engine passes a
    ModelRunner's compute_logits); `model.layers` are then called directly with the arguments that forward
    gave them; a layer returns what the next one takes first.
    """
    from scaleinfer.quantization.int4 import PackedInt4, dequantize_groupwise, fitting_group
    from scaleinfer.quantization.mixed import int8_shards

    linears = decoder_linears(model)
    for layer in linears.values():
        layer.materialize_packed(keep=True)   # dense weights for the forward passes; packed shards stay
    layers = list(model.layers)
    calls: list[list] = [[None] * len(windows) for _ in layers]    # [layer][window] -> (args, kwargs)
    current = [0]
    handed_on: set[int] = set()   # ids of the tensors the previous layer returned (not kept: replaced later)

    def recorder(i):
        def record(_module, args, kwargs):
            args = _cloned(args) if i == 0 else tuple(None if id(a) in handed_on else a for a in args)
            calls[i][current[0]] = (args, kwargs)
        return record

    def returned(_module, _args, out):
        handed_on.clear()
        handed_on.update(id(t) for t in (out if isinstance(out, tuple) else (out,)))

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(returned) for layer in layers]
    start = time.perf_counter()
    try:
        for current[0], ids in enumerate(windows):
            run_window(ids)
    finally:
        for h in handles:
            h.remove()
    probe = layers[0](*_cloned(calls[0][0][0]), **calls[0][0][1])
    carried = len(probe) if isinstance(probe, tuple) else 1            # Llama: (x, residual); Gemma: x
    states = [args[:carried] for args, _ in calls[0]]
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for i, layer in enumerate(layers):
        mine = {name: m for name, m in linears.items() if layer_of.get(id(m)) == i}
        sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in mine.items()}
        rows = dict.fromkeys(mine, 0)

        def accumulate(name):
            def hook(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name].addmm_(x.t(), x)
                rows[name] += x.shape[0]
            return hook

        handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in mine.items()]
        try:
            for w, (args, kwargs) in enumerate(calls[i]):
                layer(*_cloned(states[w]), *args[carried:], **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, m in mine.items():
            h = sums[name] / max(rows[name], 1)
            group = fitting_group(m.in_features, group_size)
            skip = set(m.packed_shards) | int8_shards(m)
            for shard, (lo, hi) in enumerate(m.shard_bounds()):
                if shard in skip:
                    continue
                packed = PackedInt4(*gptq_int4(m.weight.data[lo:hi].float(), h, group, half_scales=half_scales))
                m.weight.data[lo:hi].copy_(dequantize_groupwise(packed.qweight, packed.scale, packed.min))
                m.packed_shards[shard] = packed
        for w, (args, kwargs) in enumerate(calls[i]):   # this layer's rounded outputs feed the next one
            out = layer(*_cloned(states[w]), *args[carried:], **kwargs)
            states[w] = out if isinstance(out, tuple) else (out,)
        logger.debug("GPTQ layer %d/%d: %.1f s", i + 1, len(layers), time.perf_counter() - start)
    logger.info("GPTQ: %d layers, %d windows (%d tokens) in %.1f s", len(layers), len(windows),
                sum(map(len, windows)), time.perf_counter() - start)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (after damping), in float64 for a stable factorisation."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True).float()


def gptq_int4(w: torch.Tensor, h: torch.Tensor, group_size: int, *, half_scales: bool = False,
              act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-round w [N, K] (float32) with input statistic h [K, K] to int4 groups of `group_size`.

    Returns what `int4.quantize_groupwise` returns (packed q [N, K / 2] uint8, scale and min [N, K / G]
    float32), so the result is used as any int4 weight. `half_scales`: round each group's scale and min to
    float16 before its columns are rounded (W4A8 stores them as float16; the errors then include that).
    `act_order` (default): round the columns with the largest input energy first, so the errors flow to
    the columns that matter least; each group's grid is then fixed up front from the unmodified weights
    (its columns are visited out of order). Measured on Qwen2.5-0.5B (12 hongloumeng windows,
    Shakespeare calibration): +8.6% perplexity in column order, +5.4% in this order; nearest +9.6%.
    """
    from scaleinfer.quantization.int4 import pack_int4

    n, k = w.shape
    if k % group_size or BLOCK % group_size:
        raise ValueError(f"GPTQ needs in_features ({k}) and the block ({BLOCK}) to be multiples of the group ({group_size})")
    w = w.float().clone()
    dead = torch.diag(h) == 0
    w[:, dead] = 0.0

    def grid(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and min of groups g [..., G] from their min/max (shrinking the range to lower the
        rounding error weighted by diag H was tried: Qwen +5.9% instead of +5.4%)."""
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        s = (hi - lo) / 15.0
        if half_scales:
            s, lo = s.half().float(), lo.half().float()
        return s, lo

    scale = torch.empty(n, k // group_size)
    mn = torch.empty(n, k // group_size)
    perm = torch.arange(k)
    if act_order:
        scale, mn = grid(w.view(n, k // group_size, group_size))
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    hinv = _inverse_cholesky(h)
    q = torch.empty(n, k, dtype=torch.uint8)
    order = perm.tolist()
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].clone()
        err = torch.empty_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = order[b0 + i]
            gi = col // group_size
            if not act_order and col % group_size == 0:   # this group's grid, from its columns as updated so far
                scale[:, gi], mn[:, gi] = grid(wb[:, i:i + group_size])
                safe_scale[:, gi] = torch.where(scale[:, gi] > 0, scale[:, gi], 1.0)
            s, lo = scale[:, gi], mn[:, gi]
            x = wb[:, i]
            qi = torch.round((x - lo) / safe_scale[:, gi]).clamp_(0, 15)
            q[:, col] = qi.to(torch.uint8)
            e = (x - (qi * s + lo)) / hb[i, i]
            wb[:, i:].sub_(e[:, None] * hb[i, i:][None, :])
            err[:, i] = e
        w[:, b1:].sub_(err @ hinv[b0:b1, b1:])
    return pack_int4(q), scale, mn


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error sqrt(tr((W - W^) H (W - W^)^T) / tr(W H W^T)) over the calibration inputs."""
    d = w - w_hat
    return math.sqrt(float(((d @ h) * d).sum()) / max(float(((w @ h) * w).sum()), 1e-30))
