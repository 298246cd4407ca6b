"""Keep freed memory in the process, so CPU timings measure the model rather than the C allocator's heuristics.

glibc hands large blocks back to the operating system when they are freed (``munmap``, or ``brk`` trimming once the
free memory at the top of the heap passes ``M_TRIM_THRESHOLD``). Every tensor allocated after that touches fresh
pages, and each 4 KiB page costs a minor fault and a page clear. Which calls pay depends on the process's history:
on ``digits-dit`` (20 steps, batch 100, 2 cores) the same plain pipeline call took 13.5 s with 3.1 million minor
faults in a fresh process and 10.4 s with none once the thresholds were raised (``resource.getrusage`` around
each call, 2026-11-30; ``tests/test_allocator.py`` shows the faults on one transformer forward). Benchmarks that
compare wall-clock times call ``retain_freed_memory()`` first, so that every row, the baseline included, runs
without that tax; its shell equivalent, for any program, is::

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647

The cost is memory: the process keeps what it frees (up to its peak) instead of returning it. Blocks larger than
glibc's ceiling for the mmap threshold (32 MiB on 64-bit) are still mapped and unmapped on every allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 * 1024 * 1024  # glibc: HEAP_MAX_SIZE / 2 on 64-bit; mallopt rejects more
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int


@functools.cache
def glibc():
    """The C library when it is glibc (it has ``mallopt``), else ``None``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False (and nothing changed) off glibc."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def timing_allocator(keep_defaults: bool = False) -> str:
    """For a timing benchmark: ``retain_freed_memory()`` unless ``keep_defaults``; says which setting is in force."""
    return "freed memory retained" if not keep_defaults and retain_freed_memory() else "glibc defaults"


def release_free_memory() -> bool:
    """Hand the memory the process has freed back to the operating system now (glibc ``malloc_trim(0)``), so that
    the resident set is what is live; False off glibc. ``accel-eval`` calls it before measuring a method's peak
    memory as the rise of the peak resident set size over the resident set size just before the call."""
    libc = glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True
