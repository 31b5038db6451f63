"""The ISA levels of the CPU kernels (csrc/isa.h) and running a test on one of them."""
from __future__ import annotations

import contextlib

import pytest

from scaleinfer.kernels import cpu_kernels

ALL_ISAS = ("scalar", "avx2", "avx512", "avx512_vnni")


def isa_params() -> list[str]:
    """Every level (the ones this CPU lacks skip), or "torch" (the fallback) without the kernels."""
    return list(ALL_ISAS) if cpu_kernels() is not None else ["torch"]


@contextlib.contextmanager
def forced_isa(name: str):
    """Run on ISA level `name`, then restore the previous one; skip when this CPU lacks it."""
    ops = cpu_kernels()
    if ops is None:
        yield name
        return
    if name not in ops.isas():
        pytest.skip(f"this CPU has no {name} (best: {ops.isas()[-1]})")
    prev = ops.set_isa(name)
    try:
        yield name
    finally:
        ops.set_isa(prev)
