"""Encoder heads over packed states: sentence-embedding pooling (mean / CLS / max / mean_sqrt_len /
last, then optional L2 normalization), sequence classification and token classification as HF builds them.

EncoderModel is what the runner calls: backbone (models/bert.py or models/mpnet.py) plus the head its
config's task names. Its parameter names are the checkpoint's: the backbone under `backbone.` (the
loader maps "bert." / "mpnet." / "roberta." or no prefix there), the head as HF names it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.varlen import VarlenMetadata
from scaleinfer.models.bert import BertModel
from scaleinfer.models.encoder_config import EncoderConfig, PoolingConfig
from scaleinfer.models.mpnet import MPNetModel

BACKBONES = {"bert": BertModel, "roberta": BertModel, "xlm-roberta": BertModel, "distilbert": BertModel,
             "mpnet": MPNetModel}


def pool(states: torch.Tensor, seq_lens: list[int], cfg: PoolingConfig) -> torch.Tensor:
    """[T, hidden] packed states -> [B, hidden] one vector per sequence (every token is real: no padding)."""
    lens = torch.tensor(seq_lens, device=states.device)
    starts = torch.cumsum(lens, 0) - lens
    if cfg.mode == "cls":
        out = states.index_select(0, starts)
    elif cfg.mode == "last":
        out = states.index_select(0, starts + lens - 1)
    elif cfg.mode == "max":
        out = torch.stack([s.max(0).values for s in states.split(seq_lens)])
    else:
        seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=states.device), lens)
        sums = states.new_zeros(len(seq_lens), states.shape[1]).index_add_(0, seg, states)
        denom = lens.to(states.dtype)[:, None]
        out = sums / (denom.sqrt() if cfg.mode == "mean_sqrt_len" else denom)
    return F.normalize(out, p=2, dim=-1) if cfg.normalize else out


class _BertPooler(nn.Module):
    """BERT: dense + tanh on the first token; DistilBERT's pre_classifier: dense + ReLU."""

    def __init__(self, hidden: int, relu: bool = False):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.relu = relu

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        h = self.dense(cls)
        return torch.relu(h) if self.relu else torch.tanh(h)


class _ClassificationHead(nn.Module):
    """RoBERTa / MPNet: dense + tanh + out_proj on the first token."""

    def __init__(self, hidden: int, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls)))


class EncoderModel(nn.Module):
    """Backbone + the task head: forward(...) -> [B, dims] embeddings, [B, labels] logits, or
    [T, labels] per-token logits."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.backbone = BACKBONES[cfg.model_type](cfg)
        self.pooler: nn.Module | None = None
        self.classifier: nn.Module | None = None
        if cfg.task == "classify" and cfg.model_type in ("bert", "distilbert"):
            self.pooler = _BertPooler(cfg.hidden_size, relu=cfg.model_type == "distilbert")
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        elif cfg.task == "classify":
            self.classifier = _ClassificationHead(cfg.hidden_size, cfg.num_labels)
        elif cfg.task == "token-classify":
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None,
                meta: VarlenMetadata, task: str | None = None) -> torch.Tensor:
        """`task` (default: the config's): "embed" pools any backbone; the classifiers need their head."""
        states = self.backbone(input_ids, positions, token_type_ids, meta)
        task = task or self.config.task
        assert task == "embed" or task == self.config.task, f"{task} on a {self.config.task} model"
        if task == "embed":
            return pool(states, meta.seq_lens, self.config.pooling)
        if task == "token-classify":
            return self.classifier(states)
        lens = torch.tensor(meta.seq_lens, device=states.device)
        cls = states.index_select(0, torch.cumsum(lens, 0) - lens)
        if self.pooler is not None:
            cls = self.pooler(cls)
        return self.classifier(cls)

    def fuse(self) -> None:
        self.backbone.fuse()
