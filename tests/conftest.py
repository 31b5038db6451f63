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
