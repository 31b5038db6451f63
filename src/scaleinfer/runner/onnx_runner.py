"""ONNX for encoders: export our EncoderModel with torch.onnx.export (padded [B, L] inputs, as every ONNX
runtime expects), and OnnxEncoder, a runner that runs such a file through onnxruntime in place of
EncoderRunner (same run(batch, task) contract), for `--backend onnxruntime`.

The exported graph: inputs input_ids, attention_mask, token_type_ids (int64 [B, L]); outputs
last_hidden_state [B, L, H] and sentence_embedding [B, H] (the model's pooling and normalization), or
logits for a classifier.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from scaleinfer.attention.varlen import VarlenMetadata
from scaleinfer.errors import ConfigError
from scaleinfer.models.encoder_config import PoolingConfig
from scaleinfer.models.encoder_heads import EncoderModel
from scaleinfer.runner.encoder_runner import EncoderInput

logger = logging.getLogger(__name__)
_MEAN = PoolingConfig(mode="mean")

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json",
                    "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


class PaddedEncoder(nn.Module):
    """EncoderModel over a padded batch: the graph torch.onnx.export traces."""

    def __init__(self, model: EncoderModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        b, n = input_ids.shape
        cfg = self.model.config
        positions = torch.arange(n, device=input_ids.device).expand(b, n).reshape(-1)
        meta = VarlenMetadata.padded(b, n, attention_mask)
        states = self.model.backbone(input_ids.reshape(-1), positions, token_type_ids.reshape(-1), meta)
        states = states.reshape(b, n, -1)
        if cfg.task == "embed":
            return states, _masked_pool(states, attention_mask, cfg.pooling)
        if cfg.task == "token-classify":
            return states, self.model.classifier(states)
        cls = states[:, 0]
        if self.model.pooler is not None:
            cls = self.model.pooler(cls)
        return states, self.model.classifier(cls)


def _masked_pool(states, mask, pooling):
    m = mask.to(states.dtype)[..., None]
    if pooling.mode == "cls":
        out = states[:, 0]
    elif pooling.mode == "max":
        out = states.masked_fill(m == 0, float("-inf")).max(1).values
    else:
        count = m.sum(1).clamp(min=1)
        out = (states * m).sum(1) / (count.sqrt() if pooling.mode == "mean_sqrt_len" else count)
    return F.normalize(out, p=2, dim=-1) if pooling.normalize else out


def export_onnx(engine, output_dir: str, opset: int = 17) -> str:
    """Write output_dir/model.onnx (+ the tokenizer and sentence-transformers files) for `engine`'s model."""
    model = engine.runner.model
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError("export-onnx takes a float32 model; drop --dtype")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.onnx")
    wrapper = PaddedEncoder(model).eval()
    ids = torch.tensor([[engine.config.pad_token_id + 2] * 8, [engine.config.pad_token_id + 3] * 8])
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    second = "sentence_embedding" if engine.config.task == "embed" else "logits"
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "token_type_ids": {0: "batch", 1: "sequence"}}
    with torch.inference_mode():
        torch.onnx.export(wrapper, (ids, mask, torch.zeros_like(ids)), path, input_names=list(INPUTS),
                          output_names=["last_hidden_state", second], dynamic_axes=dims, opset_version=opset,
                          dynamo=False)
    src = engine.source_dir
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            os.makedirs(os.path.dirname(os.path.join(output_dir, name)), exist_ok=True)
            shutil.copyfile(os.path.join(src, name), os.path.join(output_dir, name))
    with open(os.path.join(output_dir, "scaleinfer_onnx.json"), "w") as f:
        json.dump({"model": engine.name, "task": engine.config.task, "opset": opset}, f)
    logger.info("exported %s to %s", engine.name, path)
    return path


class OnnxEncoder:
    """Runs an exported model.onnx with onnxruntime; run(batch, task) as EncoderRunner."""

    def __init__(self, path: str, task: str, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.task = task

    @classmethod
    def for_engine(cls, engine, onnx_dir: str | None = None) -> "OnnxEncoder":
        """The ONNX runner of an engine's model: from onnx_dir, or exported once into the cache."""
        from scaleinfer.config import model_cache_dir

        if onnx_dir is None:
            onnx_dir = os.path.join(model_cache_dir(), "onnx", os.path.basename(os.path.normpath(engine.name)))
            if not os.path.isfile(os.path.join(onnx_dir, "model.onnx")):
                export_onnx(engine, onnx_dir)
        path = os.path.join(onnx_dir, "model.onnx")
        if not os.path.isfile(path):
            raise ConfigError(f"{onnx_dir} has no model.onnx; write one with `scaleinfer export-onnx --output {onnx_dir}`")
        return cls(path, engine.config.task, torch.get_num_threads())

    def run(self, batch: list[EncoderInput], task: str) -> torch.Tensor:
        import numpy as np

        n = max(len(x.token_ids) for x in batch)
        ids = np.zeros((len(batch), n), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for i, x in enumerate(batch):
            ids[i, :len(x.token_ids)] = x.token_ids
            mask[i, :len(x.token_ids)] = 1
            if x.token_type_ids:
                types[i, :len(x.token_ids)] = x.token_type_ids
        feed = {k: v for k, v in zip(INPUTS, (ids, mask, types)) if k in self.input_names}
        states, second = self.session.run(None, feed)
        if task == "embed" and self.task != "embed":
            return _masked_pool(torch.from_numpy(states), torch.from_numpy(mask), _MEAN)
        out = torch.from_numpy(second)
        if task == "token-classify":
            return out[torch.from_numpy(mask).bool()]
        return out
