"""kernel.bpf.syscall.MapHandle.items: read in batches, the same entries as walking the keys one by one (root: it
makes a map of its own, which goes with its last fd)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from nodeagent.kernel.bpf import syscall
from nodeagent.kernel.bpf.syscall import MapHandle

BPF_MAP_CREATE, BPF_MAP_TYPE_LRU_HASH = 0, 9


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("_pad", ctypes.c_uint8 * 108)]


@pytest.fixture
def lru() -> Iterator[MapHandle]:
    fd = syscall._bpf(BPF_MAP_CREATE, _CreateAttr(BPF_MAP_TYPE_LRU_HASH, 16, 12, 65536, 0))
    handle = MapHandle(fd, 16, 12)
    try:
        yield handle
    finally:
        handle.close()


def walked(handle: MapHandle) -> dict[bytes, bytes]:
    keys = handle.keys()  # the GET_NEXT_KEY walk (MapHandle is no mapping)
    return {key: value for key in keys if (value := handle.lookup(key)) is not None}


@pytest.mark.parametrize("entries", [0, 1, 5000])
def test_batches_read_what_the_walk_reads(lru: MapHandle, entries: int) -> None:
    for i in range(entries):
        lru.update(i.to_bytes(16, "big"), (i * 7).to_bytes(12, "big"))
    items = lru.items()
    assert len(items) == entries
    assert items == walked(lru)
    # small batches: many calls, each resuming where the last one stopped, nothing read twice or skipped
    assert lru._items_batched(batch=7) == items
