"""The lock around a JIT build of the kernels: never a silent wait, never a wait on a dead process.

torch.utils.cpp_extension.load guards a build with a FileBaton: a `lock` file that the builder deletes
when done. A builder killed mid-build leaves it behind, and every later load then polls for it forever,
printing nothing. Around torch's load we take our own lock, `build.lock`, with fcntl.flock: the OS drops
it when its holder dies, however it dies. Holding it, we are the only scaleinfer process in the build
directory, so a `lock` file found there is stale (its builder is gone) and is removed. Waiting for a live
builder logs one line saying so, and gives up after `wait_s` with a one-line error.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time

logger = logging.getLogger(__name__)

TORCH_BATON = "lock"        # torch's FileBaton in the build directory
OUR_LOCK = "build.lock"     # ours, held with flock for the whole load


@contextlib.contextmanager
def build_lock(directory: str, wait_s: float):
    """Hold the build directory's lock (waiting at most `wait_s` seconds for a live builder), with any
    stale torch baton removed first."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, OUR_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            _wait_for(fd, path, wait_s)
        _remove_stale_baton(directory)
        yield
    finally:
        os.close(fd)        # releases the flock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _wait_for(fd: int, path: str, wait_s: float) -> None:
    logger.warning("waiting up to %.0f s for another process building the CPU kernels in %s (its lock: %s)",
                   wait_s, os.path.dirname(path), path)
    deadline = time.monotonic() + wait_s
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"another process is still building the CPU kernels after {wait_s:.0f} s "
                               f"(it holds {path})")
        time.sleep(0.2)


def _remove_stale_baton(directory: str) -> None:
    baton = os.path.join(directory, TORCH_BATON)
    if os.path.exists(baton):
        logger.warning("removing a stale build lock left by an interrupted kernel build: %s", baton)
        with contextlib.suppress(FileNotFoundError):
            os.remove(baton)
