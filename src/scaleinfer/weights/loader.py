"""open_checkpoint(): a catalog name, a .gguf file, an HF directory or a hub id -> Checkpoint (checkpoint.py).

The engine calls this once; the Checkpoint's config and tokenizer are ready at once, its tensors
stream on demand (dequantized one at a time) so the model can be filled without a second copy.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

from scaleinfer.errors import WeightLoadError
from scaleinfer.tokenizer import Tokenizer
from scaleinfer.weights import quantized
from scaleinfer.weights.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10.0
"""Seconds to wait for the Hugging Face hub before telling the user it is unreachable."""
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.spm", "spiece.model"]  # .spm, spiece.model: Marian, T5


def open_checkpoint(model: str) -> Checkpoint:
    """Open `model`: a catalog name (installed on demand), a .gguf file, an HF directory or a hub id."""
    from scaleinfer import catalog

    if catalog.is_catalog_name(model):
        model = catalog.resolve(model)
    if model.endswith(".gguf") or os.path.isfile(model):
        return _open_gguf(model)
    if os.path.isdir(model):
        from scaleinfer.weights import ctranslate2

        if ctranslate2.is_ctranslate2_dir(model):  # a CTranslate2 model (faster-whisper's format)
            return ctranslate2.open_ctranslate2_dir(model)
        if quantized.is_quantized_dir(model):  # written by `scaleinfer quantize`
            return quantized.open_quantized_dir(model)
        if not os.path.isfile(os.path.join(model, "config.json")):
            ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return _open_gguf(os.path.join(model, ggufs[0]))
        return _open_hf_dir(model)
    if _looks_like_hub_id(model):
        return _open_hf_dir(_download(model))
    raise WeightLoadError(_not_found(model))


def _not_found(model: str, hub: str | None = None) -> str:
    from scaleinfer import catalog

    tried = f" (as a hub repo: {hub})" if hub else ""
    return (f"model not found: {model!r}{tried}; pass a catalog name ({', '.join(catalog.names())}), a .gguf "
            f"file, an HF model directory or a hub id like org/name")


def _open_gguf(path: str) -> Checkpoint:
    from scaleinfer.weights import gguf
    from scaleinfer.weights.gguf_file import GGUFFile

    gf = GGUFFile.open(path)
    config = gguf.read_model_config(gf)
    gguf.check_tensor_types(gf)
    tokenizer = gguf.read_tokenizer(gf)
    config = dataclasses.replace(config, eos_token_ids=tokenizer.eos_token_ids)
    return Checkpoint(config, tokenizer, path, "gguf", gguf.count_tensors(gf),
                      lambda direct_int4=False: gguf.iter_tensors(gf, config, direct_int4), direct_int4=True,
                      stored_types=gguf.stored_types(gf))


def _open_hf_dir(path: str) -> Checkpoint:
    from scaleinfer.weights import safetensors as st

    config = st.read_model_config(path)
    tokenizer = Tokenizer.from_hf_dir(path, extra_eos_token_ids=config.eos_token_ids)
    config = dataclasses.replace(config, eos_token_ids=tokenizer.eos_token_ids)
    files = st.weight_files(path)
    return Checkpoint(config, tokenizer, path, "safetensors", st.count_tensors(files), lambda: st.iter_tensors(files))


_LEGACY_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _looks_like_hub_id(model: str) -> bool:
    """org/name, or a name without an organisation: the hub's legacy repos (bert-base-uncased,
    distilbert-base-uncased-finetuned-sst-2-english), cached under that name and redirected online."""
    parts = model.split("/")
    if len(parts) == 1:
        return bool(_LEGACY_HUB_NAME.match(model)) and not model.endswith(".gguf")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def _download(repo_id: str) -> str:
    """A local snapshot of an HF hub repo (config, tokenizer, safetensors): the cache first, then the hub."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # not cached (or only partly): ask the hub
        pass
    try:
        # A bounded call first: snapshot_download alone can wait far longer on a network that drops packets.
        info = HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
        names = [s.rfilename for s in info.siblings or []]
        patterns = _HUB_PATTERNS if any(n.endswith(".safetensors") for n in names) else \
            [*_HUB_PATTERNS, "pytorch_model*.bin"]   # older repos (opus-mt) hold only a PyTorch state dict
        return snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError):
        if "/" not in repo_id:   # a bare name is more often a mistyped catalog name than a legacy repo
            raise WeightLoadError(_not_found(repo_id, "the hub has no public model by that name")) from None
        raise WeightLoadError(f"{repo_id!r} is not a local path, and the Hugging Face hub has no public model "
                              f"by that name (or it is gated); check the spelling or pass a local file") from None
    except Exception as exc:  # offline mode, DNS failure, timeout, proxy ...
        if "/" not in repo_id:
            raise WeightLoadError(_not_found(repo_id, f"the hub is unreachable, {type(exc).__name__}")) from None
        raise WeightLoadError(f"{repo_id!r} is not a local path, and the Hugging Face hub is unreachable "
                              f"({type(exc).__name__}); pass a catalog name, a .gguf file or a downloaded "
                              f"model directory") from None
