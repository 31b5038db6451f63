"""What the CPU kernels are built from: the C++ sources, the compiler flags and their fingerprint.

Standard library only: setup.py loads this file by path to build the prebuilt module `scaleinfer.kernels._C`
(before scaleinfer or torch can be imported from the tree), and the loader checks that a prebuilt module
carries the fingerprint of the sources next to it (a module built before an edit of csrc/ is not used).
"""
from __future__ import annotations

import hashlib
import os

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("lowbit_linear.cpp", "int4_a8.cpp", "cpu_ops.cpp", "decode_attention.cpp", "decode_attention_512.cpp",
           "decode_attention_256.cpp", "decode_step.cpp", "int8_a8.cpp", "a8_gemm.cpp", "amx.cpp", "shm_comm.cpp")
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp", "-Wl,-z,now")
"""-z now: bind every symbol at load, so no lazy binding runs between the AMX tile set-up and its use
(glibc's resolver may reset the tile configuration; see csrc/amx.cpp)."""


def source_paths() -> list[str]:
    return [os.path.join(CSRC, name) for name in SOURCES]


def sources_hash() -> str:
    """A fingerprint of every file in csrc/ and the flags: the prebuilt module returns it from sources_hash()."""
    h = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".cpp", ".h")):
            h.update(name.encode())
            with open(os.path.join(CSRC, name), "rb") as f:
                h.update(f.read())
    return "h" + h.hexdigest()[:20]
