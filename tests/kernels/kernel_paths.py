"""Run a test on one forced kernel code path, then restore the previous one."""
from __future__ import annotations

import contextlib

from scaleinfer.kernels import cpu_kernels


@contextlib.contextmanager
def forced_path(setter_name: str, name: str):
    """`setter_name`: the kernel module's setter (set_isa, set_a8_path); a no-op without the kernels."""
    ops = cpu_kernels()
    if ops is None:
        yield name
        return
    setter = getattr(ops, setter_name)
    prev = setter(name)
    try:
        yield name
    finally:
        setter(prev)
