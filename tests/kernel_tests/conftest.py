"""The `isa` fixture: a kernel test runs once per ISA level this CPU has (csrc/isa.h)."""
from __future__ import annotations

import pytest

from .kernel_paths import forced_isa, isa_params


@pytest.fixture(params=isa_params())
def isa(request):
    with forced_isa(request.param) as name:
        yield name
