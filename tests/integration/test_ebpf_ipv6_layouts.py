"""The Python mirrors of the IPv6 Service maps' byte layouts against what bcc compiles from bpf-src/sock_lb.c and
nodeport_tc.c (its IPv6 flow map na_ct6, and the IPv6 Service maps both declare); the IPv4 ones, and the sizes the
loader opens every map with, are tests/integration/test_bpf_layouts.py's."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from nodeagent.service.ebpf import desired, flows, maps
from tests.integration.test_bpf_layouts import c_fields, compiled, declared_maps, fields

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


# nodeport_tc.c's IPv6 path: its own flow map, and the IPv6 Service maps it shares with sock_lb.c
TC_MIRRORS6 = {"na_ct6": (flows.CT_KEY6, flows.CT_VALUE6), **MIRRORS6}


@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("name", list(TC_MIRRORS6))
def test_each_ipv6_mirror_has_the_tc_program_s_compiled_layout(compiled: dict[str, Any], name: str) -> None:
    table = compiled["nodeport_tc.c"].get_table(name.encode())
    for part, layout, ctype in zip(("key", "value"), TC_MIRRORS6[name], (table.Key, table.Leaf), strict=True):
        assert isinstance(layout, struct.Struct)
        assert c_fields(ctype) == fields(layout) and len(bytes(ctype())) == layout.size, f"{name} {part}"


@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("name", list(MIRRORS6))
def test_the_two_service_programs_declare_the_ipv6_maps_alike(compiled: dict[str, Any], name: str) -> None:
    sock, tc = (compiled[program].get_table(name.encode()) for program in ("sock_lb.c", "nodeport_tc.c"))
    assert declared_maps("sock_lb.c")[name] == declared_maps("nodeport_tc.c")[name]
    assert sock.max_entries == tc.max_entries
    assert (len(bytes(sock.Key())), len(bytes(sock.Leaf()))) == (len(bytes(tc.Key())), len(bytes(tc.Leaf())))


def test_the_flow_tables_name_the_maps_the_tc_program_declares() -> None:
    declared = declared_maps("nodeport_tc.c")
    assert {layout.map_name: declared.get(layout.map_name) for layout in flows.LAYOUTS.values()} == {
        "na_ct": "lru_hash", "na_ct6": "lru_hash"}
