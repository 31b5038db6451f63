"""Open any model as an HF transformers twin (config dict + HF-named float tensors) and write HF directories.

prune and distill need a model they can hook and train; HF transformers' Llama / Qwen2 modules are
that, and they are the reference the engine is tested against. A source is whatever `--model` accepts
(catalog name, .gguf, HF directory): the engine's loader streams its tensors under HF names (GGUF
dequantized), and its config becomes an HF config.json. The output is a plain HF safetensors directory
(config.json, model.safetensors, tokenizer files) that `--model DIR` and `from_pretrained(DIR)` both load.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch

from scaleinfer.config import ModelConfig
from scaleinfer.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""Families prune / distill handle (ModelConfig.architecture -> HF class): Llama-shaped, gated SiLU MLP."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("prune and distill need HF transformers: pip install 'scaleinfer[compress]' "
                          "(or pip install transformers)") from None
    return transformers


@dataclass
class Source:
    """A model opened for compression: its engine Checkpoint, HF config dict and HF-named float32 tensors."""

    ckpt: object
    """The engine's Checkpoint (config, tokenizer, path)."""
    hf_config: dict
    state: dict[str, torch.Tensor]

    @property
    def config(self) -> ModelConfig:
        return self.ckpt.config


def open_source(model: str) -> Source:
    """Open `model` (anything `--model` accepts) with all its tensors in memory as float32."""
    from scaleinfer.weights.loader import open_checkpoint

    ckpt = open_checkpoint(model)
    if ckpt.config.architecture not in HF_CLASSES:
        raise UnsupportedModelError(f"{model!r} is a {ckpt.config.architecture} model; prune and distill handle "
                                    f"{', '.join(HF_CLASSES)} (Llama-shaped) models")
    if ckpt.format not in ("gguf", "safetensors"):
        raise ConfigError(f"{model!r} is a {ckpt.format} checkpoint; prune / distill the original model, then "
                          f"quantize the result")
    state = {name: t.float() for name, t in ckpt.tensors()}
    if ckpt.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return Source(ckpt, hf_config_of(ckpt), state)


def hf_config_of(ckpt) -> dict:
    """The source's own config.json (an HF directory), else one written from its ModelConfig (GGUF)."""
    cfg_file = os.path.join(ckpt.path, "config.json")
    if os.path.isdir(ckpt.path) and os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            return json.load(f)
    return hf_config_from(ckpt.config)


def hf_config_from(c: ModelConfig) -> dict:
    """An HF config.json dict for a Llama / Qwen2 ModelConfig (what a GGUF file's metadata says)."""
    cfg = {
        "architectures": [HF_CLASSES[c.architecture]], "model_type": c.architecture,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu", "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else
        (c.eos_token_ids[0] if c.eos_token_ids else None),
    }
    if c.architecture == "llama":
        cfg.update(attention_bias=c.attention_bias, mlp_bias=False, sliding_window=c.sliding_window)
    else:
        cfg.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window)
    return cfg


def build_hf_model(hf_config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """An HF CausalLM with `hf_config`'s shape holding `state` (strict: every tensor must fit)."""
    transformers = require_transformers()
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    model = transformers.AutoModelForCausalLM.from_config(config)   # random init, then overwritten
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"the weights do not fit the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def state_of(model) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names, the tied LM head left out (it is the embedding)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def prepare_output(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output!r} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ConfigError(f"--output {output!r} is not empty; pick a new directory or pass --overwrite")
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --output {output!r}: {exc.strerror or exc}") from None


def write_hf_dir(output: str, hf_config: dict, state: dict[str, torch.Tensor], source: Source,
                 dtype: str = "float32", extra: dict | None = None) -> None:
    """Write an HF directory: config.json, model.safetensors (in `dtype`), the source's tokenizer files, and
    `extra` as compress.json (what was done, for people; no loader reads it)."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConfigError(f"--save-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().clone() for k, v in state.items()}
    tmp = os.path.join(output, WEIGHTS_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # save_file's temporary-file mode is 0600
    os.replace(tmp, os.path.join(output, WEIGHTS_FILE))
    _copy_tokenizer(source, output)
    if extra is not None:
        with open(os.path.join(output, "compress.json"), "w", encoding="utf-8") as f:
            json.dump(extra, f, indent=1, ensure_ascii=False)
    cfg = {**hf_config, "torch_dtype": dtype, "dtype": dtype}
    with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:   # last: the dir is complete
        json.dump(cfg, f, indent=1)


def _copy_tokenizer(source: Source, output: str) -> None:
    path = source.ckpt.path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        for name in TOKENIZER_FILES:
            src = os.path.join(path, name)
            if os.path.isfile(src) and not os.path.exists(os.path.join(output, name)):
                shutil.copyfile(src, os.path.join(output, name))
        return
    from scaleinfer.weights.quantized import save_tokenizer

    save_tokenizer(source.ckpt.tokenizer, output)   # a GGUF's tokenizer, written from the loaded one


def count_params(state: dict[str, torch.Tensor]) -> int:
    """Parameters of the model (a tied LM head counted once)."""
    return sum(t.numel() for t in state.values())
