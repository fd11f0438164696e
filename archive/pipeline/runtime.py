"""Process-wide settings for processing workers.

Image processing allocates and frees many full-frame planes (a 4096x4096 float32
plane is 64 MB). glibc serves every block above its mmap threshold (at most 32 MB
by its own adaptive rule) with a fresh ``mmap`` and returns it with ``munmap`` on
free, so each such temporary costs a page fault and a zeroing per 4 kB page; on the
2-core benchmark VM that was a quarter to a third of the wall time of detection and
measurement (1.3 s of system time per 4k frame). Raising the threshold and the trim
threshold keeps freed planes in the heap for the next one: the process's resident
memory stays at its peak instead of shrinking between frames, which is what a
worker that processes frame after frame wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size (bytes) come from the heap, not from their own mmap
MMAP_THRESHOLD = 1 << 30
_done = False


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large blocks instead of unmapping them (once per process).

    Returns True when the setting was applied, False where the C library is not glibc
    (macOS, musl): there nothing changes and processing is merely slower.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("keep_freed_memory: no glibc mallopt; allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    _done = ok
    return ok
