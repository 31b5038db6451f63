"""Import direction of docs/ARCHITECTURE.md: lower layers never import higher ones, and the
pure-Python layers (L0-L2) never import torch."""
from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "scaleinfer"

LAYER = {
    "errors": 0, "config": 0, "sampling_params": 0,
    "request": 1, "tokenizer": 1, "catalog": 1, "kv_cache.block_manager": 1, "kv_cache.prefix_cache": 1,
    "attention.patterns": 1, "scheduler": 2,
    "kernels": 3, "distributed": 3, "quantization": 3, "attention": 3, "layers": 3,
    "models": 4, "weights": 4, "sampler": 4, "kv_cache.cache_tensors": 4,
    "runner": 5,
    "engine": 6,
    "llm": 7, "serving": 7, "bench": 7, "cli": 8,
}
PURE = {name for name, layer in LAYER.items() if layer <= 2}


def layer_of(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYER:
            return key, LAYER[key]
    return None


def source_modules():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts and parts != ["__main__"]:
            yield ".".join(parts), path


def imports_of(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("module,path", list(source_modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_point_down(module, path):
    own = layer_of(module)
    if own is None:
        return
    for imported in imports_of(path):
        if own[0] in PURE:
            assert imported.split(".")[0] != "torch", f"{module} is pure Python but imports {imported}"
        if not imported.startswith("scaleinfer."):
            continue
        target = layer_of(imported.removeprefix("scaleinfer."))
        if target is None or target[0] == own[0]:
            continue
        assert target[1] <= own[1], f"{module} (layer {own[1]}) imports {imported} (layer {target[1]})"


def test_kernels_import_only_config_and_errors():
    """kernels/ is layer D0: the C++ library and its loader, below every package that calls it."""
    for module, path in source_modules():
        if module.split(".")[0] != "kernels":
            continue
        for imported in imports_of(path):
            if imported.startswith("scaleinfer."):
                assert imported.split(".")[1] in ("kernels", "config", "errors"), f"{module} imports {imported}"
