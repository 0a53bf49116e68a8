"""Giving freed memory back to the system (docs/benchmarks.md, "Memory at 5,000 peers"),
and no cyclic collection while a burst's objects live (`collector_paused`).

Python hands its freed objects of more than 512 bytes back to the C allocator,
glibc's malloc, which keeps the pages of its heap unless asked: the dicts, lists
and buffers of a full data-plane pass (15,000 kernel objects read and planned
with 5,000 peers) stay in the process's RSS as free heap after it. `trim()`
asks glibc to return them (`malloc_trim(0)`, which also releases free pages in
the middle of the heap); it costs about a millisecond with a heap of ~15 MiB,
and a full pass runs every ~30 s. With another C library (musl has no
malloc_trim) it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_trim: Callable[[int], int] | None = None
_looked_up = False


def trim() -> None:
    """Return the C heap's free pages to the kernel, where the C library can."""
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            _trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: its libc's
        except (AttributeError, OSError):
            _trim = None
    if _trim is not None:
        _trim(0)


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside: a burst (a mass expiry's thousands of deletions judged,
    planned and sent) makes tens of thousands of objects that live until it ends, and
    each young collection traversed them (10 collections, 14-24 ms of ~110-150 for
    5,000 peers in memory; docs/benchmarks.md, "Round 8"). Reference counting still
    frees everything that is no cycle; the collector runs again after (nested: the
    outermost pause ends it)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
