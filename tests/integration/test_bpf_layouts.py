"""The Python mirrors of the eBPF maps' byte layouts against what bcc compiles from bpf-src.

The agent writes and reads pinned maps byte by byte (nodeagent/service/ebpf/desired.py and maps.py,
nodeagent/mesh/ebpf/state.py; the loaders open each map with a key and value size). A C struct changed without
its mirror would make the agent write entries the programs misread, silently. So each program is compiled once,
with its maps unpinned (nothing lands on bpffs, no program is loaded), and every map the agent touches must have
the mirror's key and value sizes, and, where the mirror is a struct.Struct with one item per C field, its field
offsets. The constants the Python side repeats (NM_MAX_EXCLUDE, NM_MARK_MASK) are read from the sources.
"""

from __future__ import annotations

import ctypes
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.bpf.compile_check import unpinned
from nodeagent.mesh.ebpf import programs as mesh_programs
from nodeagent.mesh.ebpf import state as mesh_state
from nodeagent.mesh.iptables import render
from nodeagent.service.ebpf import desired, flows, maps

SOURCES = ("sock_lb.c", "nodeport_tc.c", "mesh_capture.c")
# the maps the Service datapath's two programs share: both must declare them alike
SHARED = ("na_services", "na_slots", "na_backends")
_DECLARED = re.compile(r'BPF_TABLE_PINNED7?\("(\w+)", [^,]+, [^,]+, (\w+),')


@dataclass(frozen=True)
class Mirror:
    """A map's key and value as the Python side packs them (None: the mirror is only a size)."""

    program: str
    map: str
    key: struct.Struct | None
    value: struct.Struct | None


MIRRORS = (
    *(Mirror(program, "na_services", desired.SERVICE_KEY, maps.SERVICE_VALUE) for program in SOURCES[:2]),
    *(Mirror(program, "na_slots", maps.SLOT_KEY, maps.SLOT_VALUE) for program in SOURCES[:2]),
    *(Mirror(program, "na_backends", maps.BACKEND_KEY, maps.BACKEND_VALUE) for program in SOURCES[:2]),
    Mirror("nodeport_tc.c", "na_ct", flows.CT_KEY, flows.CT_VALUE),
    Mirror("mesh_capture.c", "nm_config", None, mesh_state.CONFIG),
    Mirror("mesh_capture.c", "nm_stats", None, mesh_state.STATS),
)
# the sizes each loader opens the pinned maps with
SIZES = {"sock_lb.c": loader.MAPS, "mesh_capture.c": mesh_programs.MAPS}


def declared_maps(program: str) -> dict[str, str]:
    """Map name -> map type, as the program declares them."""
    return {name: kind for kind, name in _DECLARED.findall((loader.SOURCE_DIR / program).read_text())}


@pytest.fixture(scope="module")
def compiled() -> Iterator[dict[str, Any]]:
    """Each program compiled once (about 2 s each), its maps created unpinned."""
    from bcc import BPF

    built: dict[str, Any] = {}
    try:
        for program in SOURCES:
            text = unpinned((loader.SOURCE_DIR / program).read_text())
            assert '"PIN_DIR/' not in text, "every pinned map declaration was made an ordinary one"
            built[program] = BPF(text=text.encode(), cflags=loader.CFLAGS)
        yield built
    finally:
        for bpf in built.values():
            bpf.cleanup()


def fields(layout: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each item of a standard-size layout ('=', '<', '>', '!': no alignment), pads ('x', a
    C struct's pad fields) left out; 'Ns' is one item (an address, an array), '3I' three."""
    assert layout.format[0] in "=<>!", f"{layout.format}: native alignment is not a mirror's"
    found, at = [], 0
    for count, code in re.findall(r"(\d*)([xcbB?hHiIlLqQnNefdsp])", layout.format[1:]):
        n = int(count or 1)
        if code == "x":
            at += n
        elif code in "sp":
            found.append((at, n))
            at += n
        else:
            size = struct.calcsize(f"={code}")
            found.extend((at + i * size, size) for i in range(n))
            at += n * size
    assert at == layout.size
    return found


def c_fields(ctype: type[Any]) -> list[tuple[int, int]]:
    """(offset, size) of each field of a compiled struct, its pad fields left out (a scalar: one field)."""
    members = getattr(ctype, "_fields_", None)
    if members is None:
        return [(0, ctypes.sizeof(ctype))]
    return [(getattr(ctype, name).offset, ctypes.sizeof(kind)) for name, kind, *_ in members
            if not name.lstrip("_").startswith("pad")]


def define(program: str, name: str) -> int:
    """The value of `#define name value` in a program's source."""
    found = re.search(rf"^#define {name} (\S+)", (loader.SOURCE_DIR / program).read_text(), re.MULTILINE)
    assert found, f"{name} is no longer defined in bpf-src/{program}"
    return int(found.group(1), 0)


@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: f"{m.program}:{m.map}")
def test_each_python_mirror_has_the_compiled_layout(compiled: dict[str, Any], mirror: Mirror) -> None:
    table = compiled[mirror.program].get_table(mirror.map.encode())
    for part, layout, ctype in (("key", mirror.key, table.Key), ("value", mirror.value, table.Leaf)):
        if layout is None:
            continue
        where = f"{mirror.map} {part} ({ctype.__name__} in bpf-src, {layout.format!r} in Python)"
        assert ctypes.sizeof(ctype) == layout.size, f"{where}: sizes differ"
        assert c_fields(ctype) == fields(layout), f"{where}: fields (offset, size) differ"


@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("program", list(SIZES))
def test_the_loaders_open_every_map_with_its_compiled_sizes(compiled: dict[str, Any], program: str) -> None:
    sizes = SIZES[program]
    for name, kind in declared_maps(program).items():
        if kind == "sk_storage":
            continue  # socket storage: the kernel's alone, never opened from userspace
        assert name in sizes, f"{name} ({program}) is missing from its loader's MAPS"
        table = compiled[program].get_table(name.encode())
        assert (ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)) == sizes[name], name


@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("name", SHARED)
def test_the_two_service_programs_declare_their_shared_maps_alike(compiled: dict[str, Any], name: str) -> None:
    sock, tc = (compiled[program].get_table(name.encode()) for program in SOURCES[:2])
    assert declared_maps(SOURCES[0])[name] == declared_maps(SOURCES[1])[name]
    assert sock.max_entries == tc.max_entries
    assert (ctypes.sizeof(sock.Key), ctypes.sizeof(sock.Leaf)) == (ctypes.sizeof(tc.Key), ctypes.sizeof(tc.Leaf))


def test_the_constants_python_repeats_match_the_sources() -> None:
    assert define("mesh_capture.c", "NM_MAX_EXCLUDE") == mesh_state.MAX_EXCLUDE
    assert define("mesh_capture.c", "NM_MARK_MASK") == render.MARK_MASK


def test_the_layout_reader_splits_formats_as_c_fields() -> None:
    assert fields(struct.Struct(">4sHBx")) == [(0, 4), (4, 2), (6, 1)]
    assert [at for at, _ in fields(struct.Struct("=4s4sI2s2s2sBBB3x16s16s64s"))] == [
        0, 4, 8, 12, 14, 16, 18, 19, 20, 24, 40, 56]
    assert fields(struct.Struct("=2Q")) == [(0, 8), (8, 8)]
