"""Decoding many objects at once (a list page, a manifest directory) without the cyclic GC's toll.

A list of 10,000 EndpointSlices allocates about a million objects that all stay alive; CPython's
generational collector keeps rescanning them while they are created, which tripled decoding time
in `bench/ingest.py`. None of these objects can form reference cycles, so collection is paused
while one batch decodes and resumed after.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

from nodeagent.decode import Decoded, decode, object_ref
from nodeagent.discovery.wire import Resource, with_kind
from nodeagent.model import ObjectRef


def decode_items(items: Iterable[Any], resource: Resource | None = None) -> list[tuple[ObjectRef | None, Decoded]]:
    """Decode every item (giving list items back their kind when `resource` says which it is)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        decoded = []
        for item in items:
            if resource is not None:
                item = with_kind(item, resource)
            decoded.append((object_ref(item), decode(item)))
        return decoded
    finally:
        if was_enabled:
            gc.enable()
