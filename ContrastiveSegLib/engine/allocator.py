"""Keep glibc's allocator from returning large blocks to the system after every step.

PyTorch on the CPU allocates and frees the same large activation buffers at
every training step.  glibc serves blocks above its mmap threshold with fresh
``mmap`` calls and unmaps them on free, so each step pays for page faults and
zeroing again; on this project's reference 2-core machine that cost 30-45 %
of a step (``benchmarks/bench_allocator.py`` measures it).  Raising the mmap
and trim thresholds keeps the memory in the heap for reuse.  It changes no
result, only speed, and is skipped on non-glibc systems or when
``CONTRASTIVESEG_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 30


def tune_glibc_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True if applied."""
    if not sys.platform.startswith("linux") or os.environ.get("CONTRASTIVESEG_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD_BYTES))
