"""Builds the C++ CPU kernels into the package at install time (`scaleinfer.kernels._C`), so that no
process compiles them on first use. Everything else about the package is in pyproject.toml.

torch must already be installed: install with `pip install --no-build-isolation -e .` (as the Makefile
does); an isolated build would download a second, multi-GB torch to compile against. Without a working
compiler the extension is skipped (optional) and the loader builds the kernels on first use instead.
"""
import importlib.util
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

_spec = importlib.util.spec_from_file_location("kernel_sources", os.path.join("src", "scaleinfer", "kernels", "sources.py"))
sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sources)

kernels = CppExtension(
    "scaleinfer.kernels._C",
    [os.path.join("src", "scaleinfer", "kernels", "csrc", name) for name in sources.SOURCES],
    extra_compile_args=[*sources.CFLAGS, f"-DSI_SOURCES_HASH={sources.sources_hash()}"],
    extra_link_args=list(sources.LDFLAGS),
    optional=True,
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildExtension})
