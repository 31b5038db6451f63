"""The one ISA dispatch (csrc/isa.h): the level picked at load is the best this CPU has, every level up
to it can be forced (and is, by the `isa` fixture of the kernel tests), and a bad name is refused."""
from __future__ import annotations

import pytest

from scaleinfer.kernels import cpu_isa, cpu_kernels

from .kernel_paths import ALL_ISAS

ops = cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels not built (no compiler)")


def test_the_level_in_use_is_the_best_this_cpu_has():
    assert ops.isa() == cpu_isa()                                  # /proc/cpuinfo agrees with cpuid
    assert ops.isas() == list(ALL_ISAS[: ALL_ISAS.index(cpu_isa()) + 1])


def test_set_isa_forces_a_level_and_returns_the_previous_one():
    best = ops.isa()
    assert ops.set_isa("scalar") == best
    try:
        assert ops.isa() == "scalar"
    finally:
        assert ops.set_isa(best) == "scalar"
    assert ops.isa() == best


def test_set_isa_refuses_unknown_names_and_levels_the_cpu_lacks():
    with pytest.raises(RuntimeError, match="unknown ISA 'avx9'"):
        ops.set_isa("avx9")
    missing = [name for name in ALL_ISAS if name not in ops.isas()]
    for name in missing:
        with pytest.raises(RuntimeError, match="does not support"):
            ops.set_isa(name)
    assert ops.isa() == ops.isas()[-1]
