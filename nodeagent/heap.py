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
import gc
from collections.abc import Iterator


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
