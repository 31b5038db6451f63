"""The module built at install time (setup.py: scaleinfer.kernels._C) is used only when it was built from
the sources csrc/ holds now; otherwise (none, or csrc/ edited since) the loader takes the JIT build."""
from __future__ import annotations

import shutil
import types

import pytest

from scaleinfer.kernels import loader, sources


def test_the_fingerprint_follows_every_source_and_header(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    shutil.copytree(sources.CSRC, csrc)
    monkeypatch.setattr(sources, "CSRC", str(csrc))
    before = sources.sources_hash()
    assert before == sources.sources_hash() and before.startswith("h")
    (csrc / "isa.h").write_text((csrc / "isa.h").read_text() + "\n// edited\n")
    assert sources.sources_hash() != before


@pytest.mark.parametrize("built_from,used", [("now", True), ("other", False)])
def test_a_prebuilt_module_is_used_only_if_built_from_these_sources(monkeypatch, caplog, built_from, used):
    fingerprint = sources.sources_hash() if built_from == "now" else "h0"
    fake = types.SimpleNamespace(sources_hash=lambda: fingerprint, __file__="/site/scaleinfer/kernels/_C.so")
    monkeypatch.setattr(loader.importlib, "import_module", lambda name: fake)
    assert (loader.prebuilt_kernels() is fake) == used
    assert ("other sources than csrc/" in caplog.text) == (not used)


def test_no_prebuilt_module_means_the_jit_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(loader.importlib, "import_module", missing)
    assert loader.prebuilt_kernels() is None


def test_every_bound_class_is_module_local():
    """A stale prebuilt module is imported (to read its fingerprint) before the JIT build loads: two modules
    registering the same class globally make the second import fail ("type DecodeProgram is already
    registered") and every kernel falls back to torch. module_local() keeps each module's types its own."""
    import pathlib
    import re

    bindings = []
    for path in pathlib.Path(sources.CSRC).glob("*.cpp"):
        bindings += re.findall(r"class_<[^>]+>\([^;]*?\)", path.read_text())
    assert bindings, "no class bindings found: has the binding style changed?"
    assert all("module_local()" in b for b in bindings), [b for b in bindings if "module_local()" not in b]
