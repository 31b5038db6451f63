"""The model families; models/registry.py holds one entry per family (adding one: a file plus an entry)."""
from __future__ import annotations

from scaleinfer.models.registry import FAMILIES, Family, family


def get_model_class(architecture: str):
    """The model class of ModelConfig.architecture `architecture`."""
    return family(architecture).model_class


__all__ = ["FAMILIES", "Family", "family", "get_model_class"]
