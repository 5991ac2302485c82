"""Keep a long-running server's resident memory bounded: glibc's allocator, tuned for PyTorch on the CPU.

Each time glibc frees a large block it raises its mmap threshold to that block's size (up to 32 MiB): from
then on, tensors of a decoding step's size (logits, activations) come from the heap instead of their own
mappings, and the heap's freed pages fragment and stay resident, spread over one arena per thread that ever
allocated (the worker, every edit's thread, uvicorn's). A fixed threshold keeps large tensors in mappings
that go back to the system when freed, two arenas bound the fragmentation, and trimming when the server
goes idle returns what the heap still holds free. Without glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>
M_ARENA_MAX = -8


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def bound_allocator(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Set the threshold and the arena count (call once, early). Whether glibc took them."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_ARENA_MAX, arenas))
    if not ok:
        log.warning("glibc refused the allocator settings: resident memory may grow with fragmentation")
    return ok


def trim() -> None:
    """Return the heap's free pages to the system (malloc_trim): cheap when idle, a no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
