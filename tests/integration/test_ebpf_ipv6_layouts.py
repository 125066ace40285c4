"""The Python mirrors of the IPv6 Service maps' byte layouts against what bcc compiles from bpf-src/sock_lb.c
(the IPv4 ones, and the sizes the loader opens every map with, are tests/integration/test_bpf_layouts.py's)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from nodeagent.service.ebpf import desired, maps
from tests.integration.test_bpf_layouts import c_fields, compiled, fields

__all__ = ["compiled"]  # the module-scoped fixture: each program compiled once, its maps unpinned

MIRRORS6 = {
    "na_services6": (desired.SERVICE_KEY6, maps.SERVICE_VALUE),
    "na_slots6": (maps.SLOT_KEY, maps.SLOT_VALUE),
    "na_backends6": (maps.BACKEND_KEY, maps.BACKEND_VALUE6),
}


@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("name", list(MIRRORS6))
def test_each_ipv6_mirror_has_the_compiled_layout(compiled: dict[str, Any], name: str) -> None:
    table = compiled["sock_lb.c"].get_table(name.encode())
    for part, layout, ctype in zip(("key", "value"), MIRRORS6[name], (table.Key, table.Leaf), strict=True):
        assert isinstance(layout, struct.Struct)
        assert c_fields(ctype) == fields(layout) and len(bytes(ctype())) == layout.size, f"{name} {part}"


@pytest.mark.root
@pytest.mark.bcc
def test_the_family_maps_name_what_the_program_declares(compiled: dict[str, Any]) -> None:
    for names in maps.FAMILY_MAPS.values():
        for name in (names.services, names.slots, names.backends):
            compiled["sock_lb.c"].get_table(name.encode())  # KeyError if the program has no such map
