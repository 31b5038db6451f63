"""Shared fixtures: the real model files the suite runs on (installed by `make test`)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub from tests


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    from scaleinfer import catalog

    return catalog.resolve("smollm2-135m-instruct")
