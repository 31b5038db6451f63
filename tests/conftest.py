"""Shared fixtures: the real model files the suite runs on (installed by `make test`)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub from tests


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    from scaleinfer import catalog

    return catalog.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path):
    """Our Tokenizer built from the SmolLM2 GGUF's metadata (tokenizer + weights tests)."""
    from scaleinfer.tokenizer import Tokenizer
    from scaleinfer.weights import gguf
    from scaleinfer.weights.gguf_file import GGUFFile

    return Tokenizer.from_gguf_fields(gguf.tokenizer_fields(GGUFFile.open(smollm2_gguf_path)))


@pytest.fixture
def offline_hf_cache(tmp_path):
    """cache(repo_id, model_dir) -> env: an HF cache under tmp_path holding model_dir as repo_id's snapshot, and
    the environment (HF_HOME, HF_HUB_OFFLINE=1) for a subprocess that must find it there and nowhere else
    (huggingface_hub reads HF_HOME when imported, hence a subprocess)."""
    import shutil

    home = tmp_path / "hf"

    def cache(repo_id: str, model_dir) -> dict:
        repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
        rev = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(model_dir, repo / "snapshots" / rev)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(rev)
        env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        env.pop("HF_HUB_CACHE", None)
        return env

    return cache
