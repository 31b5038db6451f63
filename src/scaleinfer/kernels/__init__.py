"""The C++ CPU kernels (csrc/: norms, RoPE, SiLU, KV write, paged decode attention, low-bit matmuls, the
decode program) as one module, and its loader: `cpu_kernels()` returns it, or None without a compiler.

Layer D0: imports nothing from scaleinfer but config and errors.
"""
from scaleinfer.kernels.loader import cpu_isa, cpu_kernels

__all__ = ["cpu_isa", "cpu_kernels"]
