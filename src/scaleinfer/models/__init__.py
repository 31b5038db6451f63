"""ARCHITECTURES: family name -> model class. Adding a family is a file plus one line here."""
from __future__ import annotations

from scaleinfer.errors import UnsupportedModelError
from scaleinfer.models.gemma3 import Gemma3ForCausalLM
from scaleinfer.models.llama import LlamaForCausalLM
from scaleinfer.models.qwen2 import Qwen2ForCausalLM

ARCHITECTURES = {
    "gemma3": Gemma3ForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def get_model_class(architecture: str):
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
