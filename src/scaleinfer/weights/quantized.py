"""Quantized checkpoints: `scaleinfer quantize` writes one (engine.loading.quantize_to_dir builds the
model, save_quantized writes it), `--model DIR` loads it without re-quantizing.

A directory holds
    scaleinfer_config.json   format tag, the ModelConfig, the quantization mode and every packed
                             layer's method and parameters (int4 group size per layer: a layer whose
                             in_features does not divide the group falls back to a smaller one)
    model.safetensors        the model's state dict after quantization: packed buffers (qweight,
                             weight_scale, weight_min), biases, embeddings and norms, under module names
    tokenizer.json, tokenizer_config.json, generation_config.json
                             the tokenizer (written from the loaded one, so a GGUF source works too)

Loading builds the model, swaps each listed Linear's dense weight for the stored buffers (no copy,
no quantization) and copies the remaining tensors into place, so the logits equal quantizing the
source on the fly bit for bit (same integers, same scales, same kernels).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import typing

import torch

from scaleinfer.errors import ConfigError, WeightLoadError
from scaleinfer.weights.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

FORMAT = "scaleinfer-quantized"
VERSION = 1
CONFIG_FILE = "scaleinfer_config.json"
TENSOR_FILE = "model.safetensors"
_PACKED_BUFFERS = ("qweight", "weight_scale", "weight_min")


def is_quantized_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


# ---- writing ------------------------------------------------------------------------------------
def _method_spec(method) -> dict:
    spec = {"method": method.name}
    if hasattr(method, "group_size"):
        spec["group_size"] = int(method.group_size)
    if hasattr(method, "bands"):           # mixed.RowSplit: its bands are listed as layers of their own
        spec["bands"] = method.bands
    return spec


def _make_method(spec: dict):
    """The method a checkpoint's layer spec names (quantization/table.py: METHODS), with its parameters."""
    from scaleinfer.quantization.table import METHODS

    name = spec.get("method")
    cls = METHODS.get(name)
    if cls is None:
        raise WeightLoadError(f"quantized checkpoint lists an unknown method {name!r}; it was written by a newer "
                              f"scaleinfer")
    try:
        if "bands" in spec:                    # mixed.RowSplit
            return cls(spec["bands"])
        return cls(group_size=int(spec["group_size"])) if "group_size" in spec else cls()
    except (ValueError, TypeError) as exc:
        raise WeightLoadError(f"quantized checkpoint: {exc}") from None


def prepare_output_dir(output: str, overwrite: bool) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output!r} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite and not is_quantized_dir(output):
        raise ConfigError(f"--output {output!r} is not empty; pick a new directory (or an earlier quantize "
                          f"output, which is replaced)")
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to --output {output!r}: {exc.strerror or exc}") from None


def save_quantized(model, ckpt, mode: str, output: str, source: str = "", calibration: str | None = None) -> dict:
    """Write `model` (built from `ckpt` and quantized with `mode`) to `output`; returns the config dict.
    `calibration`: the text file the int4 weights were GPTQ-rounded on (recorded, not needed to load)."""
    from safetensors.torch import save_file

    from scaleinfer.layers.linear import DenseLinearMethod, Linear

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not isinstance(module.quant_method, DenseLinearMethod):
            layers[name] = _method_spec(module.quant_method)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:                        # a tied weight (LM head = embedding): stored once
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(ckpt.config),
        "quantization": {"mode": mode, "layers": layers,
                         "rounding": "gptq" if calibration else "nearest", "calibration": calibration},
        "tied": tied,
        "source": {"model": source, "path": ckpt.path, "format": ckpt.format},
    }
    tmp = os.path.join(output, TENSOR_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", "scaleinfer": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, os.path.join(output, TENSOR_FILE))
    save_tokenizer(ckpt.tokenizer, output)
    with open(os.path.join(output, CONFIG_FILE), "w", encoding="utf-8") as f:  # last: marks the dir complete
        json.dump(config, f, indent=1)
    return config


def save_tokenizer(tok, output: str) -> None:
    if tok.backend is None:  # a SentencePiece tokenizer with no tokenizer.json (Marian): copy its files
        tok.save_files(output)
    else:
        tok.backend.save(os.path.join(output, "tokenizer.json"))
        specials = dict(getattr(tok, "_special_tokens", {}))
        cfg = {"add_bos_token": bool(tok.add_bos_token), "chat_template": tok.chat_template,
               **{k: specials.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if specials.get(k)}}
        with open(os.path.join(output, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)
    with open(os.path.join(output, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": list(tok.eos_token_ids)}, f, indent=1)


# ---- reading ------------------------------------------------------------------------------------
def quantization_of(path: str) -> str | None:
    """The mode of the `scaleinfer quantize` directory `path` ("int4", "int4 (GPTQ on FILE)"), else None."""
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return None
    q = _read_config(path)["quantization"]
    return mode_label(q["mode"], q["calibration"] if q.get("rounding") == "gptq" else None)


def mode_label(mode: str, calibration: str | None) -> str:
    """How a quantized model is named in reports: "int4", or "int4 (GPTQ on FILE)" when calibrated."""
    return f"{mode} (GPTQ on {calibration})" if calibration else mode


def _read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"cannot read {os.path.join(path, CONFIG_FILE)} ({exc}); re-run scaleinfer quantize")
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("version"), int) or cfg["version"] > VERSION:
        raise WeightLoadError(f"{path}: not a scaleinfer quantized checkpoint of a supported version "
                              f"(format {cfg.get('format')!r}, version {cfg.get('version')!r})")
    return cfg


def _model_config(d: dict):
    from scaleinfer.config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {}
    for k, v in d.items():
        if k not in known:
            continue
        if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple:
            v = tuple(v)
        kwargs[k] = v
    return ModelConfig(**kwargs)


def open_quantized_dir(path: str):
    """A Checkpoint (format FORMAT) for a `scaleinfer quantize` directory; build_model loads it with load_quantized."""
    from scaleinfer.tokenizer import Tokenizer

    cfg = _read_config(path)
    config = _model_config(cfg["model_config"])
    tokenizer = Tokenizer.from_hf_dir(path, extra_eos_token_ids=config.eos_token_ids)
    config = dataclasses.replace(config, eos_token_ids=tokenizer.eos_token_ids)
    tensor_file = os.path.join(path, TENSOR_FILE)
    if not os.path.isfile(tensor_file):
        raise WeightLoadError(f"{path} has no {TENSOR_FILE}; re-run scaleinfer quantize")

    def tensors():
        from safetensors import safe_open

        with safe_open(tensor_file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    try:
        from safetensors import safe_open

        with safe_open(tensor_file, framework="pt") as f:
            num_tensors = len(list(f.keys()))
    except Exception as exc:
        raise WeightLoadError(f"cannot read {tensor_file} ({exc}); re-run scaleinfer quantize") from None
    return Checkpoint(config, tokenizer, path, FORMAT, num_tensors, tensors)


def load_quantized(model, ckpt, config):
    """Fill `model` (freshly built, uninitialised) from the quantized directory `ckpt.path`; no re-quantizing."""
    from safetensors.torch import load_file

    from scaleinfer.layers.linear import Linear
    from scaleinfer.quantization.layer_ops import drop_dense_weight

    cfg = _read_config(ckpt.path)
    mode = cfg["quantization"]["mode"]
    if config.quantization not in ("none", "auto", mode):
        raise ConfigError(f"{ckpt.path} is already quantized with {mode}; drop --quantization (or pass {mode})")
    start = time.perf_counter()
    try:
        tensors = load_file(os.path.join(ckpt.path, TENSOR_FILE))
    except Exception as exc:  # truncated or corrupt file
        raise WeightLoadError(f"cannot read {os.path.join(ckpt.path, TENSOR_FILE)} ({exc}); re-run scaleinfer "
                              f"quantize") from None
    for name, spec in cfg["quantization"]["layers"].items():   # a split layer comes before its bands
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, Linear):
            raise WeightLoadError(f"quantized checkpoint layer {name!r} has no Linear in {type(model).__name__}")
        method = _make_method(spec)
        drop_dense_weight(layer)
        if hasattr(method, "attach"):       # RowSplit: empty bands, filled as the following layers
            try:
                method.attach(layer)
            except (ValueError, TypeError) as exc:
                raise WeightLoadError(f"quantized checkpoint layer {name!r}: {exc}") from None
            layer.quant_method = method
            continue
        for buf in _PACKED_BUFFERS:
            t = tensors.get(f"{name}.{buf}")
            if t is not None:
                layer.register_buffer(buf, t)
        if getattr(layer, "qweight", None) is None or layer.qweight.shape[0] != layer.out_features:
            raise WeightLoadError(f"quantized checkpoint: {name}.qweight is missing or does not fit "
                                  f"{layer.out_features} output features")
        layer.quant_method = method
    expected = model.state_dict()
    for alias in cfg.get("tied", {}):
        expected.pop(alias, None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightLoadError(f"quantized checkpoint {ckpt.path} does not fit the model: missing "
                              f"{', '.join(missing[:5]) or '-'}; unexpected {', '.join(unexpected[:5]) or '-'}")
    for name, target in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(target.shape):
            raise WeightLoadError(f"quantized checkpoint: {name} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(target.shape)}")
        if target.data_ptr() != t.data_ptr():  # packed buffers are the loaded tensors themselves
            target.copy_(t)  # state_dict() tensors share storage with the parameters and buffers
    for module in model.modules():  # the dense ones (none in the built-in modes): their layout
        if isinstance(module, Linear) and module.weight is not None:
            module.quant_method.process_weights_after_loading(module)
    model.to(config.device).eval()
    logger.debug("quantized checkpoint (%s) loaded in %.2f s", mode, time.perf_counter() - start)
    return model
