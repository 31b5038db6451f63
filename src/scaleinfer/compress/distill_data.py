"""Distillation data: token windows of the training text, the held-out tail, the batch of each step, and the
teacher's top-k logits of each window (computed once, kept in memory).

The held-out windows are the last `holdout` fraction of each file's windows: contiguous text the student
never trains on, so the held-out perplexity is honest. The batch of step s is a pure function of (seed, s):
window order is a fresh permutation per epoch seeded by (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from scaleinfer.errors import ConfigError


@dataclass
class TextSplit:
    train: list[list[int]]
    held_out: list[list[int]]


def read_texts(paths: Sequence[str]) -> list[str]:
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                out.append(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --text {path!r}: {exc}") from None
    return out


def split_windows(tokenizer, texts: Sequence[str], seq_len: int, holdout: float) -> TextSplit:
    """Non-overlapping windows of `seq_len` tokens (a BOS first where the model wants one) per text; the
    last ceil(holdout x n) windows of each text are held out."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout}: give the fraction of each text held out for evaluation, in [0, 1)")
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
    size = seq_len - len(bos)
    split = TextSplit([], [])
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        windows = [bos + ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]
        held = math.ceil(holdout * len(windows)) if holdout else 0
        if len(windows) - held < 1:
            raise ConfigError(f"a --text of {len(ids)} tokens gives {len(windows)} windows of {seq_len}; it needs "
                              f"at least {held + 1} (use a longer text or a smaller --seq-len)")
        split.train.extend(windows[:len(windows) - held])
        split.held_out.extend(windows[len(windows) - held:])
    return split


def batch_indices(step: int, batch_size: int, num_windows: int, seed: int) -> list[int]:
    """The training windows of step `step` (0-based): positions step*B .. step*B+B-1 of an endless sequence
    of per-epoch permutations."""
    out = []
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(p, num_windows)
        order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[i]))
    return out


class TeacherCache:
    """The teacher's top-k logits (values float32, indices int32) of each window, computed on first use and
    kept in CPU memory (k x 8 bytes a token) whatever device the teacher runs on."""

    def __init__(self, teacher_logits: Callable[[torch.Tensor], torch.Tensor], windows: list[list[int]], top_k: int):
        self._logits = teacher_logits
        self._windows = windows
        self.top_k = top_k
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, k] values and indices for the windows `indices` (missing ones in one teacher pass)."""
        missing = [i for i in indices if i not in self._cache]
        if missing:
            logits = self._logits(torch.tensor([self._windows[i] for i in missing]))
            values, idx = torch.topk(logits.float(), self.top_k, dim=-1)
            for j, i in enumerate(missing):
                self._cache[i] = (values[j].cpu().clone(), idx[j].to(torch.int32).cpu().clone())
        return (torch.stack([self._cache[i][0] for i in indices]),
                torch.stack([self._cache[i][1] for i in indices]).long())
