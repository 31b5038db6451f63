"""Loads the C++ CPU kernels (csrc/): the module built at install time, else a JIT build on first use.

`pip install --no-build-isolation -e .` (the Makefile) compiles them into `scaleinfer.kernels._C`
(setup.py); the loader uses that module when it imports and was built from the sources in csrc/ now
(sources.py: their fingerprint). Otherwise torch.utils.cpp_extension builds them once, saying so in one
line, into `<model cache>/kernels/torch-<version>/` (SCALEINFER_CACHE, see config.model_cache_dir),
under a lock that never waits silently (build_lock.py); `python -m scaleinfer.kernels` says which. The C++ side picks AVX-512 (+VNNI), AVX2+FMA or scalar code
from the CPU's features once, at load (csrc/isa.h). When no compiler is available, `cpu_kernels()` returns None
and every method falls back to plain torch ops (correct, slower).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import shutil
import sys
import time

import torch

from scaleinfer.config import model_cache_dir
from scaleinfer.kernels.build_lock import build_lock
from scaleinfer.kernels.sources import CFLAGS, LDFLAGS, source_paths, sources_hash

logger = logging.getLogger(__name__)

_SOURCES = source_paths()
JIT_NAME = "scaleinfer_lowbit"
BUILD_WAIT_S = 900.0   # the longest wait for another process's build (a cold one on 2 busy cores: ~4 min)


def build_dir() -> str:
    return os.path.join(model_cache_dir(), "kernels", f"torch-{torch.__version__.split('+')[0]}")


def cpu_isa() -> str:
    """The best ISA level this CPU has, from /proc/cpuinfo: what csrc/isa.h picks at load."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return "unknown"
    if not {"avx2", "fma"} <= flags:
        return "scalar"
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx2"
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512"


def _ensure_ninja_on_path() -> None:
    """torch's cpp_extension runs `ninja` from PATH; the pip `ninja` package puts it in the venv's bin,
    which is not on PATH when the venv's python is run directly (as `make` does)."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in dirs:
        if os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _needs_compile(directory: str) -> bool:
    """Whether a JIT load will compile: no library yet, or a source or header newer than it."""
    lib = os.path.join(directory, JIT_NAME + ".so")
    if not os.path.isfile(lib):
        return True
    csrc = os.path.dirname(_SOURCES[0])
    newest = max(os.path.getmtime(os.path.join(csrc, f)) for f in os.listdir(csrc))
    return newest > os.path.getmtime(lib)


def jit_kernels(wait_s: float | None = None):
    """Build (or load the cached build of) the kernels with torch's JIT, under the build directory's lock
    (build_lock.py: a stale lock is recovered, a live build waited for at most `wait_s`, one line said)."""
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    directory = build_dir()
    with build_lock(directory, BUILD_WAIT_S if wait_s is None else wait_s):
        if _needs_compile(directory):
            logger.warning("building the CPU kernels once (1-4 min on a few cores) into %s", directory)
        return load(JIT_NAME, _SOURCES, build_directory=directory, extra_cflags=list(CFLAGS),
                    extra_ldflags=list(LDFLAGS), verbose=False)


def prebuilt_kernels():
    """The module setup.py built at install time, or None: not built (no compiler then, or a plain source
    checkout), not importable (another torch), or built from other sources than csrc/ holds now."""
    try:
        mod = importlib.import_module("scaleinfer.kernels._C")
    except ModuleNotFoundError:
        return None
    except Exception as exc:  # e.g. an undefined symbol: built against another torch
        logger.warning("the prebuilt CPU kernels do not load (%s); using a JIT build", _first_line(exc))
        return None
    if mod.sources_hash() != sources_hash():
        logger.warning("the prebuilt CPU kernels %s were built from other sources than csrc/ holds now "
                       "(reinstall to rebuild them); using a JIT build", mod.__file__)
        return None
    return mod


@functools.lru_cache(maxsize=1)
def cpu_kernels():
    """The compiled kernel module (the low-bit linears, the fused ops of cpu_ops.cpp, the decode program,
    isa / isas / set_isa) or None, with a one-line warning, when it cannot be built or loaded."""
    try:
        start = time.perf_counter()
        mod = prebuilt_kernels() or jit_kernels()
        logger.debug("CPU kernels ready (%s) in %.1f s", mod.isa(), time.perf_counter() - start)
        return mod
    except Exception as exc:  # no compiler, no headers, a build that never ends: the torch path still works
        logger.warning("CPU kernels unavailable, using the slower torch fallback: %s", _first_line(exc))
        return None


def _first_line(exc: Exception) -> str:
    """A one-line reason: the compiler's first error line if there is one, else the message's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keys = ("error:", "not found", "no such file", "permission denied", "failed")
    reason = next((line for k in keys for line in lines if k in line.lower() and len(line) < 400), None)
    reason = reason or (lines[0] if lines else "")
    return f"{type(exc).__name__}: {reason[:200]}"


def main() -> int:
    """`python -m scaleinfer.kernels` (run by `make`): load (or build) the kernels, say which, one line."""
    start = time.perf_counter()
    try:
        ops = prebuilt_kernels() or jit_kernels()
    except Exception as exc:
        print(f"CPU kernels NOT built ({_first_line(exc)}); CPU ISA {cpu_isa()}; "
              f"the slower torch fallback will be used")
        return 1
    where = "prebuilt at install" if ops.__name__ == "scaleinfer.kernels._C" else f"JIT build under {build_dir()}"
    print(f"CPU kernels ready in {time.perf_counter() - start:.1f} s: ISA {ops.isa()} (CPU supports {cpu_isa()}), "
          f"{where}: {ops.__file__}")
    return 0
