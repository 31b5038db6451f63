"""Checkpoint: a model on disk as the engine sees it (config, tokenizer, streamed HF-named tensors).

Made by weights/loader.py (GGUF, HF safetensors) and weights/quantized.py (`scaleinfer quantize` output).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from scaleinfer.config import ModelConfig
from scaleinfer.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """A model on disk: its architecture, its tokenizer, and its weights as HF-named tensors."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    """The .gguf file or the HF model directory."""
    format: str
    """"gguf", "safetensors" or "scaleinfer-quantized" (a `scaleinfer quantize` directory)."""
    num_tensors: int
    _tensors: Callable[..., Iterator[tuple[str, torch.Tensor]]]
    direct_int4: bool = False
    """Whether tensors(direct_int4=True) can hand over 4-bit weights packed (GGUF Q4_0/Q4_1/Q4_K)."""
    stored_types: dict[str, str] = field(default_factory=dict)
    """HF name -> GGML type name of each tensor as the file stores it (GGUF only; `--quantization auto`)."""

    def tensors(self, direct_int4: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named float32 tensors, one at a time, with a progress bar on a terminal. With `direct_int4`
        (only where the checkpoint supports it) some decoder linear weights come as PackedInt4."""
        bar = tqdm(total=self.num_tensors, desc=f"loading {os.path.basename(os.path.normpath(self.path))}",
                   unit="tensor", disable=not sys.stderr.isatty(), leave=False)
        with bar:
            for item in (self._tensors(direct_int4=True) if direct_int4 else self._tensors()):
                bar.update(1)
                yield item
