"""open_checkpoint(): a catalog name, a .gguf file, an HF directory or a hub id -> Checkpoint."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from scaleinfer.config import ModelConfig
from scaleinfer.errors import WeightLoadError
from scaleinfer.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    format: str  # "gguf" or "safetensors"
    num_tensors: int
    _tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named float tensors, one at a time, with a progress bar on a terminal."""
        bar = tqdm(total=self.num_tensors, desc=f"loading {os.path.basename(self.path)}", unit="tensor",
                   disable=not sys.stderr.isatty(), leave=False)
        with bar:
            for item in self._tensors():
                bar.update(1)
                yield item


def open_checkpoint(model: str) -> Checkpoint:
    from scaleinfer import catalog

    if catalog.is_catalog_name(model):
        model = catalog.resolve(model)
    if model.endswith(".gguf") or os.path.isfile(model):
        return _open_gguf(model)
    if os.path.isdir(model):
        return _open_hf_dir(model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _open_hf_dir(_download(model))
    raise WeightLoadError(f"model not found: {model!r}; pass a catalog name ({', '.join(catalog.names())}), "
                          f"a .gguf file, an HF model directory or a hub id like org/name")


def _open_gguf(path: str) -> Checkpoint:
    from scaleinfer.weights import gguf

    reader = gguf.open_reader(path)
    config = gguf.read_model_config(reader)
    tokenizer = Tokenizer.from_gguf_fields(gguf.tokenizer_fields(reader))
    return Checkpoint(config, tokenizer, path, "gguf", len(reader.tensors),
                      lambda: gguf.iter_tensors(reader, config))


def _open_hf_dir(path: str) -> Checkpoint:
    from scaleinfer.weights import safetensors as st

    config = st.read_model_config(path)
    tokenizer = Tokenizer.from_hf_dir(path)
    files = st.weight_files(path)
    return Checkpoint(config, tokenizer, path, "safetensors", st.count_tensors(files),
                      lambda: st.iter_tensors(files))


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"],
                                 etag_timeout=5)
    except Exception as exc:  # offline, unknown repo, gated ...
        raise WeightLoadError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}); "
                              f"the hub may be unreachable: pass a local .gguf file or model directory") from None
