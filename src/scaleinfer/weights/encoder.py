"""Open an HF encoder directory (BERT / MiniLM / MPNet / RoBERTa, optionally sentence-transformers) and
load it into models/encoder_heads.EncoderModel: config, pooling, tokenizer and tensors by name.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from scaleinfer.errors import WeightLoadError
from scaleinfer.models.encoder_config import ENCODER_MODEL_TYPES, EncoderConfig, PoolingConfig, read_encoder_config, read_pooling
from scaleinfer.models.encoder_heads import EncoderModel
from scaleinfer.weights import safetensors as st

logger = logging.getLogger(__name__)

_BACKBONE_PREFIXES = ("bert.", "mpnet.", "roberta.", "distilbert.", "model.")
_DISTILBERT_NAMES = (("transformer.layer.", "encoder.layer."), (".attention.q_lin.", ".attention.self.query."),
                     (".attention.k_lin.", ".attention.self.key."), (".attention.v_lin.", ".attention.self.value."),
                     (".attention.out_lin.", ".attention.output.dense."),
                     (".sa_layer_norm.", ".attention.output.LayerNorm."), (".ffn.lin1.", ".intermediate.dense."),
                     (".ffn.lin2.", ".output.dense."), (".output_layer_norm.", ".output.LayerNorm."))
"""DistilBERT tensor names -> the BERT names our model uses (the same layer, spelled differently)."""
_SKIPPED = ("embeddings.position_ids", "lm_head.", "cls.", "pooler.")


@dataclass
class EncoderCheckpoint:
    config: EncoderConfig
    tokenizer: object
    """A `tokenizers.Tokenizer` (no truncation, no padding: the engine does both)."""
    path: str


def _json(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightLoadError(f"cannot read {path} ({exc}); re-download the model") from None


def is_encoder_dir(path: str) -> bool:
    """Whether `path` is an HF model directory whose config.json names an encoder model_type."""
    cfg = _json(os.path.join(path, "config.json")) if os.path.isdir(path) else None
    return isinstance(cfg, dict) and cfg.get("model_type") in ENCODER_MODEL_TYPES


def _sentence_transformers_pooling(path: str, hf: dict):
    modules = _json(os.path.join(path, "modules.json")) or []
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    pool_module = types.get("Pooling")
    pool_cfg = _json(os.path.join(path, pool_module.get("path", "1_Pooling"), "config.json")) if pool_module else None
    dims = tuple(int(d) for d in hf.get("matryoshka_dimensions") or ())
    if hf.get("is_matryoshka") and not dims:
        dims = tuple(range(1, int(hf["hidden_size"]) + 1))   # any size (vLLM's is_matryoshka)
    pooling = read_pooling(pool_cfg, normalize="Normalize" in types, matryoshka_dims=dims)
    if pooling is None and dims:   # a plain HF encoder that declares Matryoshka sizes: mean pooling
        pooling = PoolingConfig(mode="mean", matryoshka_dims=dims)
    st_cfg = _json(os.path.join(path, "sentence_bert_config.json")) or {}
    return pooling, st_cfg.get("max_seq_length")


def _tokenizer(path: str):
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    tok_file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_file):
        tok = Tokenizer.from_file(tok_file)
    elif os.path.isfile(os.path.join(path, "vocab.txt")):
        cfg = _json(os.path.join(path, "tokenizer_config.json")) or {}
        tok = BertWordPieceTokenizer(os.path.join(path, "vocab.txt"), lowercase=cfg.get("do_lower_case", True))
    else:
        return None
    tok.no_truncation()
    tok.no_padding()
    return tok


def open_encoder(path: str) -> EncoderCheckpoint:
    hf = _json(os.path.join(path, "config.json"))
    if not isinstance(hf, dict):
        raise WeightLoadError(f"{path} has no config.json; pass an HF model directory")
    pooling, st_max = _sentence_transformers_pooling(path, hf)
    cfg = read_encoder_config(hf, os.path.join(path, "config.json"), pooling, st_max)
    return EncoderCheckpoint(cfg, _tokenizer(path), path)


def _our_name(name: str, model: EncoderModel) -> str | None:
    """The EncoderModel parameter of a checkpoint tensor, or None to skip it."""
    if name.startswith("classifier."):
        return name if model.classifier is not None else None
    if name.startswith("pre_classifier."):   # DistilBERT's dense + ReLU before the classifier
        return "pooler.dense." + name.removeprefix("pre_classifier.") if model.pooler is not None else None
    if model.config.model_type == "distilbert":
        for theirs, ours in _DISTILBERT_NAMES:
            name = name.replace(theirs, ours)
    for prefix in _BACKBONE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith("pooler.") and model.pooler is not None:
        return name
    if name.startswith(_SKIPPED):
        return None
    return "backbone." + name


def load_encoder(ckpt: EncoderCheckpoint, dtype: torch.dtype = torch.float32, device: str = "cpu") -> EncoderModel:
    """The checkpoint's EncoderModel with every parameter filled (a missing one is an error)."""
    with torch.device("meta"):
        model = EncoderModel(ckpt.config)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in st.iter_tensors(st.weight_files(ckpt.path)):
        ours = _our_name(name, model)
        if ours is None:
            continue
        if ours not in params:
            raise WeightLoadError(f"{ckpt.path}: tensor {name!r} has no place in a {ckpt.config.model_type} "
                                  f"{ckpt.config.task} model; is config.json the checkpoint's own?")
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise WeightLoadError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config says "
                                  f"{tuple(params[ours].shape)}")
        state[ours] = tensor.to(dtype)
    missing = sorted(set(params) - set(state))
    if missing:
        raise WeightLoadError(f"{ckpt.path}: {len(missing)} tensors are missing (first: {missing[0]}); the "
                              f"checkpoint does not match its config.json")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device).eval()
    model.fuse()
    return model
