"""How the agent's heap is collected: a large, long-lived, acyclic object graph.

The agent holds every Service, EndpointSlice and their translation: at 10,000 Services about a
million small objects, created in bursts (a list, the first snapshot) and then kept for hours.
CPython's cyclic collector is tuned for the opposite (short-lived objects that may form cycles) and
rescans the whole young generation on every 700 allocations; measured at that size on 2 slow cores,
parsing, decoding and folding a full list took 3x as long with it running. Two tools, both only
about *when* the collector runs, never whether memory is freed (reference counting frees it):

- `collector_paused()` around one burst of acyclic allocations;
- `settle()` once the initial state is in: collect once, then move every surviving object into the
  permanent generation (`gc.freeze`), so later collections do not rescan a million objects that
  cannot be garbage.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Iterator

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic collector for one burst of acyclic allocations.

    Safe across threads: a burst only re-enables a collector it found enabled, so overlapping bursts
    can end a pause early (the later one just runs slower) but never leave the collector off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle() -> None:
    """Collect once, then exempt every object alive now from future collections (see the module doc)."""
    gc.collect()
    gc.freeze()


def limit_malloc_retention() -> bool:
    """Make glibc give large freed blocks back to the kernel; returns whether it could be set (glibc only).

    A sync's transient buffers (the ~30 MB restore input at 10,000 Services, list arrays of 300,000
    lines) are malloc'ed, not pymalloc'ed. glibc's dynamic mmap threshold rises to the size of the
    largest block freed (up to 32 MB) and its trim threshold to twice that, so after the first full
    sync such buffers come from the heap and stay in the RSS when freed: measured +45 MB at the first
    periodic resync. Fixed thresholds (and two malloc arenas for the agent's few threads) keep them out.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, 256 << 10), (_M_TRIM_THRESHOLD, 1 << 20), (_M_ARENA_MAX, 2)))
