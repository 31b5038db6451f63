"""Transparent huge pages under big, long-lived CPU tensors: madvise(MADV_HUGEPAGE) on their storage.

Where the kernel's THP mode is `madvise` (/sys/kernel/mm/transparent_hugepage/enabled; this VM's is), a region
is backed by 2 MiB pages only when asked, before its pages are first touched. The KV cache asks
(kv_cache/cache_tensors.py): decode attention reads a token's whole KV (94 MB per token for SmolLM2 at 4,096
tokens of context, float16) in runs of one cache block each, anywhere in the cache; with 4 KiB pages that
is a TLB miss (a page walk, nested under a VM) every 4 KiB. Linux only; elsewhere, and for tensors under
4 MiB, nothing is asked.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import sys

import torch

logger = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


@functools.lru_cache(maxsize=1)
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for 2 MiB pages under the whole 2 MiB-aligned part of t's storage; True when the kernel took the
    advice (it then backs those pages with huge pages as they are first written, where THP allows)."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    storage = t.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi - lo < HUGE_PAGE:
        return False
    if _madvise()(lo, hi - lo, MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
        return False
    return True
