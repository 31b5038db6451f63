"""EncoderRunner: one forward of an encoder over a batch of tokenized sequences, packed back to back.

No KV cache and no padding in the linear layers: the B sequences become one [T] row of ids, their
positions restart at 0 for each, their lengths go to the varlen attention (attention/varlen.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from scaleinfer.attention.varlen import VarlenMetadata
from scaleinfer.models.encoder_heads import EncoderModel


@dataclass
class EncoderInput:
    token_ids: list[int]
    token_type_ids: list[int] | None = None


class EncoderRunner:
    def __init__(self, model: EncoderModel, device: str = "cpu"):
        self.model = model
        self.device = device

    @torch.inference_mode()
    def run(self, batch: list[EncoderInput], task: str) -> torch.Tensor:
        """[B, dims] (embed / classify) or [T, labels] (token-classify) for the batch, in batch order."""
        lens = [len(x.token_ids) for x in batch]
        ids = torch.tensor([t for x in batch for t in x.token_ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        types = None
        if any(x.token_type_ids for x in batch):
            types = torch.tensor([t for x in batch for t in (x.token_type_ids or [0] * len(x.token_ids))],
                                 dtype=torch.long, device=self.device)
        return self.model(ids, positions, types, VarlenMetadata.build(lens, self.device), task).float()
