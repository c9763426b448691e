"""Keeping freed memory for the next batch: glibc's allocator hands every block above its mmap
threshold (at most 32 MiB unless set) back to the system when it is freed, so the next batch's
feature maps of that size start on fresh pages that the kernel zeroes at their first touch.

A pass over images allocates the same large maps batch after batch: VGG11 x4, 250 images of
32x32, writes 262 MB per model in its first layer alone, and the statistics pass holds every
merge point's maps until the batch is folded. On a 2-core Intel Xeon VM, two VGG11 x4 models on
500 images ran their bare forward 0.89x and their statistics pass 0.82x as long with freed
memory kept in the heap, the statistics pass 1.30x the forward instead of 1.42x (medians of
three rounds of fresh processes: ``benchmarks/freed_memory.py``). Only during a pass
(:func:`for_a_pass`): kept for the whole process, the heap also kept every block the solves and
transforms freed, and two VGG11 x8 models, 16 GB live at their peak, ran out of 24 GB. The CLI
asks for it and the library never does; scripts call :func:`keep_freed_memory` themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW = 2**31 - 1  # mallopt takes an int: blocks up to 2 GiB come from the heap
GIVE_BACK_FROM = 128 * 1024  # between passes: glibc's initial mmap threshold, fixed
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD")
_mallopt = _trim = None  # glibc's, once keep_freed_memory took effect
_depth, _lock = 0, threading.Lock()


def keep_freed_memory() -> bool:
    """Keep freed memory for reuse during every forward pass over data from now on (the
    statistics pass, the BatchNorm reset: :func:`for_a_pass`), for the rest of the process.
    Returns whether it took effect: ``False`` where the C library is not glibc (macOS, Windows,
    musl) and where the user chose the allocator's behaviour (one of :data:`USER_SETTINGS` set:
    theirs stands, e.g. jemalloc or tcmalloc preloaded)."""
    global _mallopt, _trim
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt, _trim = mallopt, trim
    return True


@contextlib.contextmanager
def for_a_pass() -> Iterator[None]:
    """While a pass runs (outermost of nested ones, any thread), glibc serves blocks up to
    :data:`KEEP_BELOW` bytes from its heap and keeps freed ones there (mmap and trim thresholds
    raised), once :func:`keep_freed_memory` took effect; after it, blocks from
    :data:`GIVE_BACK_FROM` bytes are mmapped again and the heap's free pages go back to the
    system (``malloc_trim``), so the solves that follow, whose blocks differ in size from the
    pass's feature maps, start from the live memory. A no-op otherwise."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1 and _mallopt is not None:
            _mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)
            _mallopt(M_TRIM_THRESHOLD, KEEP_BELOW)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _mallopt is not None:
                _mallopt(M_MMAP_THRESHOLD, GIVE_BACK_FROM)
                _mallopt(M_TRIM_THRESHOLD, GIVE_BACK_FROM)
                _trim(0)
