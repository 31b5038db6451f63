"""The JIT build never waits silently: a lock left by a killed build is recovered, a live build is waited
for with one line saying so, and a wait that runs out gives up with a one-line warning (then the torch
fallback is used). Each case runs the loader in a subprocess with a bounded wait (a hang fails the test
instead of stalling the suite), on an empty SCALEINFER_CACHE, with torch's `load` replaced by its locking
alone: torch's own FileBaton (which polls forever for a `lock` file left behind), then a stand-in module.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from scaleinfer.kernels import loader

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
LOAD = """
import logging, os, sys, types
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
import torch.utils.cpp_extension as cpp
from torch.utils.file_baton import FileBaton

def load(name, sources, build_directory, **kwargs):   # torch's locking, no compiler
    baton = FileBaton(os.path.join(build_directory, "lock"))
    if baton.try_acquire():
        baton.release()
    else:
        baton.wait()
    return types.SimpleNamespace(isa=lambda: "stand-in")

cpp.load = load
from scaleinfer.kernels import loader
loader.BUILD_WAIT_S = {wait}
loader.prebuilt_kernels = lambda: None                 # the JIT path even where a prebuilt module exists
mod = loader.cpu_kernels()
print("ISA", mod.isa() if mod else None)
"""


def _build_dir(cache: str) -> str:
    return os.path.join(cache, "kernels", os.path.basename(loader.build_dir()))


def _load(cache: str, wait_s: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, SCALEINFER_CACHE=cache, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", LOAD.format(wait=wait_s)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_lock_left_by_a_killed_build_is_recovered(tmp_path):
    build = _build_dir(str(tmp_path))
    os.makedirs(build)
    with open(os.path.join(build, "lock"), "w"):     # torch's baton of a build that was killed
        pass
    done = _load(str(tmp_path), wait_s=60)
    assert done.returncode == 0 and done.stdout.strip() == "ISA stand-in", done.stderr[-2000:]
    assert "stale build lock" in done.stderr and not os.path.exists(os.path.join(build, "lock"))


def test_a_live_build_is_waited_for_with_one_line_then_given_up(tmp_path):
    build = _build_dir(str(tmp_path))
    os.makedirs(build)
    fd = os.open(os.path.join(build, "build.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)                   # another process building right now
    try:
        done = _load(str(tmp_path), wait_s=1)
    finally:
        os.close(fd)
    assert done.returncode == 0 and done.stdout.strip() == "ISA None", done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert [line for line in lines if line.startswith("waiting") and build in line], lines
    assert "unavailable" in lines[-1] and "TimeoutError" in lines[-1], lines   # one line, then the fallback
