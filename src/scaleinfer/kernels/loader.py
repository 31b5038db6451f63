"""Loads the C++ CPU kernels (csrc/): builds them with torch.utils.cpp_extension on first use.

The shared library is cached under `<model cache>/kernels/torch-<version>/` (SCALEINFER_CACHE, see
config.model_cache_dir), so only the first process pays the ~20 s compile; `make` pre-builds it with
`python -m scaleinfer.kernels`. The C++ side picks AVX-512 (+VNNI), AVX2+FMA or scalar code
from the CPU's features once, at load (csrc/isa.h). When no compiler is available, `cpu_kernels()` returns None
and every method falls back to plain torch ops (correct, slower).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time

import torch

from scaleinfer.config import model_cache_dir
from scaleinfer.kernels.build_lock import build_lock

logger = logging.getLogger(__name__)

_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", f) for f in ("lowbit_linear.cpp", "int4_a8.cpp",
                                                                        "cpu_ops.cpp", "decode_step.cpp",
                                                                        "int8_a8.cpp")]
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
        return load(JIT_NAME, _SOURCES, build_directory=directory, extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)


@functools.lru_cache(maxsize=1)
def cpu_kernels():
    """The compiled kernel module (the low-bit linears, the fused ops of cpu_ops.cpp, the decode program,
    isa / isas / set_isa) or None, with a one-line warning, when it cannot be built or loaded."""
    try:
        start = time.perf_counter()
        mod = jit_kernels()
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
    """`python -m scaleinfer.kernels` (run by `make`): build or load the kernel, one line."""
    start = time.perf_counter()
    try:
        ops = jit_kernels()
    except Exception as exc:
        print(f"low-bit CPU kernels NOT built ({_first_line(exc)}); CPU ISA {cpu_isa()}; "
              f"the slower torch fallback will be used")
        return 1
    print(f"low-bit CPU kernels ready in {time.perf_counter() - start:.1f} s: ISA {ops.isa()} "
          f"(CPU supports {cpu_isa()}), library under {build_dir()}")
    return 0
