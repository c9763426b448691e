"""Keeping freed memory for the next batch: glibc's allocator hands every block above its mmap
threshold (at most 32 MiB unless set) back to the system when it is freed, so the next batch's
feature maps of that size start on fresh pages that the kernel zeroes at their first touch.

A pass over images allocates the same large maps batch after batch: VGG11 x4, 250 images of
32x32, writes 262 MB per model in its first layer alone, and the statistics pass holds every
merge point's maps until the batch is folded. On a 2-core Intel Xeon VM, two VGG11 x4 models on
500 images ran their bare forward 0.89x and their statistics pass 0.82x as long with freed
memory kept in the heap, the statistics pass 1.30x the forward instead of 1.42x (medians of
three rounds of fresh processes: ``benchmarks/freed_memory.py``). The cost:
the process keeps its peak memory instead of returning freed blocks between passes, which is
what a command-line run wants and a long-lived server may not, so the CLI asks for it and the
library never does; scripts call :func:`keep_freed_memory` themselves.
"""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW = 2**31 - 1  # mallopt takes an int: blocks up to 2 GiB come from the heap
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Ask glibc to serve blocks up to :data:`KEEP_BELOW` bytes from its heap and keep freed
    ones there for reuse (mmap and trim thresholds raised), for the rest of the process.
    Returns whether it took effect: ``False`` where the C library is not glibc (macOS, Windows,
    musl) and where the user chose the allocator's behaviour (one of :data:`USER_SETTINGS` set:
    theirs stands, e.g. jemalloc or tcmalloc preloaded)."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                          KEEP_BELOW))
