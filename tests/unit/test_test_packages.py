"""pytest (prepend import mode) imports a test folder with an __init__.py as a top-level package of its
own name: a folder named like an installed distribution shadows it for every later import. transformers
5.x imports the pip package `kernels`, so a `tests/kernels/` package broke the collection of every test
that imports transformers. This keeps the test packages' names clear of what is installed."""
from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _top_level_test_packages() -> dict[str, Path]:
    """name -> folder, for each test package whose parent folder is not a package (pytest's basename)."""
    return {init.parent.name: init.parent for init in TESTS.rglob("__init__.py")
            if not (init.parent.parent / "__init__.py").exists()}


def test_no_test_package_shadows_an_installed_module():
    packages = _top_level_test_packages()
    assert "kernel_tests" in packages     # the walk finds the packages it guards
    roots = {str(folder.parent) for folder in packages.values()} | {"", str(Path.cwd())}
    installed_path = [p for p in sys.path if p not in roots]
    shadowing = {name: spec.origin for name in packages
                 if (spec := importlib.machinery.PathFinder.find_spec(name, installed_path)) is not None}
    assert not shadowing, f"rename these test folders, they shadow installed modules: {shadowing}"
