"""The low-bit CPU kernels (csrc/lowbit_linear.cpp): built with torch.utils.cpp_extension on first use.

The shared library is cached under `<model cache>/kernels/torch-<version>/` (SCALEINFER_CACHE, see
config.model_cache_dir), so only the first process pays the ~20 s compile; `make` pre-builds it with
`python -m scaleinfer.quantization.kernels`. The C++ side picks AVX-512, AVX2+FMA or scalar code
from the CPU's features at run time. When no compiler is available, `lowbit_ops()` returns None
and every method falls back to plain torch ops (correct, slower).
"""
from __future__ import annotations

import functools
import logging
import os
import time

import torch

from scaleinfer.config import model_cache_dir

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "lowbit_linear.cpp")
_NAME = "scaleinfer_lowbit"


def build_dir() -> str:
    return os.path.join(model_cache_dir(), "kernels", f"torch-{torch.__version__.split('+')[0]}")


@functools.lru_cache(maxsize=1)
def lowbit_ops():
    """The compiled kernel module (int8_linear, int4_linear, int4_dequantize, isa, set_isa) or None."""
    try:
        from torch.utils.cpp_extension import load

        os.makedirs(build_dir(), exist_ok=True)
        start = time.perf_counter()
        mod = load(_NAME, [_SOURCE], build_directory=build_dir(), extra_cflags=["-O3", "-fopenmp"],
                   extra_ldflags=["-fopenmp"], verbose=False)
        logger.debug("low-bit kernels ready (%s) in %.1f s", mod.isa(), time.perf_counter() - start)
        return mod
    except Exception as exc:  # no compiler, no headers: the pure-torch path still works
        logger.warning("low-bit CPU kernels unavailable, using the slower torch fallback: %s", exc)
        return None


def main() -> int:
    start = time.perf_counter()
    ops = lowbit_ops()
    if ops is None:
        print("low-bit kernels could not be built (see the warning above); the torch fallback will be used")
        return 1
    print(f"low-bit kernels built in {time.perf_counter() - start:.1f} s under {build_dir()} (code path: {ops.isa()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
