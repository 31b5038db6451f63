"""EncoderConfig: the shape of a BERT-family encoder and its head, read from HF/sentence-transformers dicts.

Pure data: weights/encoder.py reads the files (config.json, modules.json, 1_Pooling/config.json,
sentence_bert_config.json) and hands their dicts here; models/bert.py and models/mpnet.py build from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scaleinfer.errors import UnsupportedModelError

ENCODER_MODEL_TYPES = ("bert", "mpnet", "roberta", "xlm-roberta", "distilbert")
_DISTILBERT_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                    "hidden_dim": "intermediate_size", "activation": "hidden_act"}
TASKS = ("embed", "classify", "token-classify")
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "last")


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    """How token states become one vector: mean (over real tokens), cls (the first token), max, mean_sqrt_len."""
    normalize: bool = False
    """L2-normalize the pooled vector (sentence-transformers' Normalize module)."""
    matryoshka_dims: tuple[int, ...] = ()
    """Output sizes the model was trained to be truncated to (Matryoshka); empty: only the full size."""


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    """"bert" (also MiniLM), "mpnet", "roberta", "xlm-roberta" or "distilbert"."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    type_vocab_size: int = 0
    """0: the model has no token-type embeddings (MPNet)."""
    pad_token_id: int = 0
    position_offset: int = 0
    """First position id of a sequence: 0 for BERT, pad_token_id + 1 for RoBERTa and MPNet."""
    relative_attention_num_buckets: int = 0
    """MPNet's relative position buckets; 0: none."""
    task: str = "embed"
    num_labels: int = 0
    id2label: dict[int, str] = field(default_factory=dict)
    problem_type: str | None = None
    """HF's problem_type: "multi_label_classification" scores with sigmoid, otherwise softmax."""
    head_prefix: str = ""
    """The backbone's tensor-name prefix in a checkpoint with a head ("bert.", "mpnet.", "roberta.")."""
    pooling: PoolingConfig = PoolingConfig()
    max_seq_length: int = 512
    """The longest input (tokens, specials included) the model takes."""

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings - self.position_offset


def read_encoder_config(hf: dict, path: str, pooling: PoolingConfig | None,
                        st_max_seq_length: int | None) -> EncoderConfig:
    """The EncoderConfig of an HF config.json dict (`path` for messages); `pooling` and `st_max_seq_length`
    come from the sentence-transformers files when present."""
    model_type = hf.get("model_type")
    if model_type not in ENCODER_MODEL_TYPES:
        raise UnsupportedModelError(f"{path}: model_type {model_type!r} is not an encoder we run; supported: "
                                    f"{', '.join(ENCODER_MODEL_TYPES)}")
    if model_type == "distilbert":   # DistilBERT spells the BERT shape its own way; no token types
        hf = {**hf, **{ours: hf[theirs] for theirs, ours in _DISTILBERT_KEYS.items() if theirs in hf},
              "type_vocab_size": 0}
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedModelError(f"{path}: hidden_act {act!r} is not supported (gelu, gelu_new, relu)")
    archs = hf.get("architectures") or []
    task = "embed"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        task = "classify"
    elif any(a.endswith("ForTokenClassification") for a in archs):
        task = "token-classify"
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    num_labels = len(id2label) if task != "embed" else 0
    pad = int(hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0)
    offset = pad + 1 if model_type in ("mpnet", "roberta", "xlm-roberta") else 0
    max_len = int(hf["max_position_embeddings"]) - offset
    if st_max_seq_length:
        max_len = min(max_len, int(st_max_seq_length))
    return EncoderConfig(
        model_type=model_type, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
        intermediate_size=int(hf["intermediate_size"]), max_position_embeddings=int(hf["max_position_embeddings"]),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), hidden_act=act,
        type_vocab_size=0 if model_type == "mpnet" else int(hf.get("type_vocab_size", 2)),
        pad_token_id=pad, position_offset=offset,
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)) if model_type == "mpnet" else 0,
        task=task, num_labels=num_labels, id2label=id2label, problem_type=hf.get("problem_type"),
        head_prefix={"xlm-roberta": "roberta."}.get(model_type, f"{model_type}.") if task != "embed" else "",
        pooling=pooling or PoolingConfig(mode="cls" if task == "classify" else "mean"),
        max_seq_length=max_len,
    )


def read_pooling(pool: dict | None, normalize: bool, matryoshka_dims: tuple[int, ...] = ()) -> PoolingConfig | None:
    """sentence-transformers' 1_Pooling/config.json dict -> PoolingConfig (None when the model has none)."""
    if pool is None:
        return None
    modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                              ("max", "pooling_mode_max_tokens"), ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
                              ("last", "pooling_mode_lasttoken")) if pool.get(key)]
    if len(modes) != 1:
        raise UnsupportedModelError(f"sentence-transformers pooling {modes or 'none'} is not supported; "
                                    f"exactly one of {', '.join(POOLINGS)} must be on")
    return PoolingConfig(mode=modes[0], normalize=normalize, matryoshka_dims=matryoshka_dims)
