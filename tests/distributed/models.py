"""The real models the distributed tests run on, and a skip when one is not in the cache."""
from __future__ import annotations

import os

import pytest

from scaleinfer.config import model_cache_dir

QWEN = "qwen2.5-coder-0.5b-instruct"
GEMMA = "gemma-3-270m"
FILES = {QWEN: "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf", GEMMA: "gemma-3-270m.Q4_K_M.gguf"}


def needs(model: str):
    path = os.path.join(model_cache_dir(), FILES[model])
    return pytest.mark.skipif(not os.path.exists(path), reason=f"{model} not in the model cache ({path})")
