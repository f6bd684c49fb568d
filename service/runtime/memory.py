"""The process's memory as the operating system sees it: resident bytes, and glibc's malloc_trim, which hands pages
the heap keeps after a large free back to the system. Both are no-ops (0, False) where they do not exist."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable


@functools.cache
def libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """malloc_trim(0) now, on the caller's thread; False where there is none."""
    fn = libc_malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
