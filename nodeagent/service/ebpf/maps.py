"""Keeping the socket load balancer's maps equal to the desired entries, change by change.

A frontend's backend set is never edited in place. A new set gets a new version id: its slots are
written first, then the frontend's entry is pointed at the version in one map update, then the old
version's slots are deleted. A connect sees the old set or the new one, never a mix. Backend ids are
stable per (Service port, ip, port), so ClientIP affinity survives unrelated changes and ends when
its backend leaves the Service (the program checks that the backend id still exists).

`adopt()` reads what the maps hold (after an agent restart, or to reconcile drift), so `apply()`
then writes only the difference.

One `MapSync` per family (`family=6`: na_services6, na_slots6, na_backends6), as the agent runs one proxier per
family: each numbers its versions and backends on its own and never reads or deletes the other's entries.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.service.ebpf.desired import Backend, Frontend, ServiceEntry

log = structlog.get_logger("nodeagent.service.ebpf.maps")

# The maps' byte layouts, as the programs (bpf-src/sock_lb.c, nodeport_tc.c) declare them in bpf-src/lib/maps.h;
# tests/integration/test_bpf_layouts.py compares each with what bcc compiles. Changing one changes a pinned
# map's layout: that bumps LAYOUT_VERSION in nodeagent/kernel/bpf/loader.py. Numbers are in host order
# except addresses and ports, which the programs compare with the socket's or packet's (network order).
# The na_services key is `Frontend.key` (desired.py, `struct svc_key`).

# must match `struct svc_val` in bpf-src/lib/maps.h: version id, backend count, total weight, affinity seconds,
# flags (NA_SVC_EXTERNAL_STACK: tc leaves outside traffic to this frontend to the iptables rules)
SERVICE_VALUE = struct.Struct("=IIIII")
NA_SVC_EXTERNAL_STACK = 1
# must match `struct slot_key` in bpf-src/lib/maps.h: version id, slot
SLOT_KEY = struct.Struct("=II")
# must match `struct slot_val` in bpf-src/lib/maps.h: backend id, cumulative weight
SLOT_VALUE = struct.Struct("=II")
# must match the na_backends key (a u32 backend id) in bpf-src/sock_lb.c and nodeport_tc.c
BACKEND_KEY = struct.Struct("=I")
# must match `struct backend_val` in bpf-src/lib/maps.h: address, port (network order), pad (zero)
BACKEND_VALUE = struct.Struct(">4sH2x")
# must match `struct backend_val6` in bpf-src/lib/maps.h (na_backends6): 16-byte address, port, pad (zero)
BACKEND_VALUE6 = struct.Struct(">16sH2x")


@dataclass(frozen=True)
class FamilyMaps:
    """The names of one family's maps the agent writes."""

    services: str
    slots: str
    backends: str


FAMILY_MAPS = {4: FamilyMaps("na_services", "na_slots", "na_backends"),
               6: FamilyMaps("na_services6", "na_slots6", "na_backends6")}


def _backend_value(ip: str, port: int) -> bytes:
    if ":" in ip:
        return BACKEND_VALUE6.pack(socket.inet_pton(socket.AF_INET6, ip), port)
    return BACKEND_VALUE.pack(socket.inet_aton(ip), port)


def _backend_from_value(value: bytes) -> tuple[str, int]:
    if len(value) == BACKEND_VALUE6.size:
        ip6, port = BACKEND_VALUE6.unpack(value)
        return str(ipaddress.IPv6Address(ip6)), port
    ip, port = BACKEND_VALUE.unpack(value)
    return socket.inet_ntoa(ip), port


@dataclass
class Installed:
    """What the maps hold for one frontend."""

    version: int
    backend_ids: tuple[int, ...]
    entry: ServiceEntry


@dataclass
class SyncStats:
    written: int = 0
    removed: int = 0
    map_updates: int = 0


@dataclass
class MapSync:
    """The maps of one datapath's family (4 or 6) and what they are known to hold."""

    maps: Mapping[str, MapHandle]
    family: int = 4
    installed: dict[Frontend, Installed] = field(default_factory=dict)
    backend_ids: dict[tuple[str, str, int], int] = field(default_factory=dict)
    refs: Counter[int] = field(default_factory=Counter)
    next_version: int = 1
    next_backend: int = 1

    def adopt(self, desired: Mapping[Frontend, ServiceEntry], *, clean: bool = True) -> None:
        """Learn what the maps hold now; entries the maps hold but `desired` lacks are removed on apply.

        `clean` also deletes slots and backends nothing points at (left by a crash between two writes).
        """
        services, slots, backends = (self.maps[self.names.services].items(), self.maps[self.names.slots].items(),
                                     self.maps[self.names.backends].items())
        by_version: dict[int, dict[int, tuple[int, int]]] = {}
        for key, value in slots.items():
            version, slot = SLOT_KEY.unpack(key)
            by_version.setdefault(version, {})[slot] = SLOT_VALUE.unpack(value)
        backend_at = {BACKEND_KEY.unpack(k)[0]: _backend_from_value(v) for k, v in backends.items()}
        self.installed.clear()
        self.backend_ids.clear()
        self.refs.clear()
        for key, value in services.items():
            frontend = Frontend.from_key(key)
            version, count, _total, affinity, flags = SERVICE_VALUE.unpack(value)
            ids, members, previous = [], [], 0
            for slot in range(count):
                backend_id, cumulative = by_version.get(version, {}).get(slot, (0, 0))
                ids.append(backend_id)
                ip, port = backend_at.get(backend_id, ("::" if self.family == 6 else "0.0.0.0", 0))
                members.append(Backend(ip, port, cumulative - previous))
                previous = cumulative
            label = desired[frontend].port_name if frontend in desired else f"<stale {frontend}>"
            entry = ServiceEntry(label, tuple(members), affinity, external_stack=bool(flags & NA_SVC_EXTERNAL_STACK))
            self.installed[frontend] = Installed(version, tuple(ids), entry)
            for backend_id, member in zip(ids, members, strict=True):
                self.backend_ids[(label, member.ip, member.port)] = backend_id
                self.refs[backend_id] += 1
        self.next_version = 1 + max((v.version for v in self.installed.values()), default=0)
        self.next_version = max(self.next_version, 1 + max(by_version, default=0))
        self.next_backend = 1 + max(backend_at, default=0)
        if not clean:
            return
        live_versions = {i.version for i in self.installed.values()}
        for version, members_of in by_version.items():
            if version not in live_versions:
                for slot in members_of:
                    self.maps[self.names.slots].delete(SLOT_KEY.pack(version, slot))
        for backend_id in backend_at:
            if self.refs[backend_id] == 0:
                self.maps[self.names.backends].delete(BACKEND_KEY.pack(backend_id))
        log.info("ebpf maps adopted", family=f"IPv{self.family}", frontends=len(self.installed),
                 backends=len(backend_at))

    @property
    def names(self) -> FamilyMaps:
        """The maps of this family."""
        return FAMILY_MAPS[self.family]

    def apply(self, desired: Mapping[Frontend, ServiceEntry], *, only: set[str] | None = None) -> SyncStats:
        """Make the maps hold `desired` (restricted to entries of the port names in `only`, when given); every
        frontend must be of this family (the other family's maps are another `MapSync`'s)."""
        stats = SyncStats()
        foreign = [f for f in desired if f.family != self.family]
        if foreign:
            raise ValueError(f"the IPv{self.family} maps were given IPv{foreign[0].family} frontends: {foreign[0]}")
        for frontend, entry in desired.items():
            current = self.installed.get(frontend)
            if current is not None and current.entry == entry:
                continue
            self._install(frontend, entry, current, stats)
        for frontend in [f for f, i in self.installed.items()
                         if f not in desired and (only is None or i.entry.port_name in only)]:
            self._uninstall(frontend, stats)
        return stats

    def _backend_id(self, port_name: str, backend: Backend, stats: SyncStats) -> int:
        key = (port_name, backend.ip, backend.port)
        backend_id = self.backend_ids.get(key)
        if backend_id is None:
            backend_id = self.backend_ids[key] = self.next_backend
            self.next_backend += 1
            self.maps[self.names.backends].update(BACKEND_KEY.pack(backend_id),
                                                  _backend_value(backend.ip, backend.port))
            stats.map_updates += 1
        return backend_id

    def _install(self, frontend: Frontend, entry: ServiceEntry, current: Installed | None, stats: SyncStats) -> None:
        ids = tuple(self._backend_id(entry.port_name, b, stats) for b in entry.backends)
        version = 0
        total = 0
        if ids:
            version = self.next_version
            self.next_version += 1
            for slot, (backend_id, backend) in enumerate(zip(ids, entry.backends, strict=True)):
                total += max(1, backend.weight)
                self.maps[self.names.slots].update(SLOT_KEY.pack(version, slot), SLOT_VALUE.pack(backend_id, total))
                stats.map_updates += 1
        # The switch: one update makes the complete new set visible.
        flags = NA_SVC_EXTERNAL_STACK if entry.external_stack else 0
        value = SERVICE_VALUE.pack(version, len(ids), total, entry.affinity_seconds, flags)
        self.maps[self.names.services].update(frontend.key, value)
        stats.map_updates += 1
        stats.written += 1
        for backend_id in ids:
            self.refs[backend_id] += 1
        self.installed[frontend] = Installed(version, ids, entry)
        if current is not None:
            self._release(current, stats)

    def _uninstall(self, frontend: Frontend, stats: SyncStats) -> None:
        current = self.installed.pop(frontend)
        self.maps[self.names.services].delete(frontend.key)
        stats.map_updates += 1
        stats.removed += 1
        self._release(current, stats)

    def _release(self, old: Installed, stats: SyncStats) -> None:
        for slot in range(len(old.backend_ids)):
            if old.version:
                self.maps[self.names.slots].delete(SLOT_KEY.pack(old.version, slot))
                stats.map_updates += 1
        for backend_id, backend in zip(old.backend_ids, old.entry.backends, strict=True):
            self.refs[backend_id] -= 1
            if self.refs[backend_id] <= 0:
                del self.refs[backend_id]
                self.backend_ids.pop((old.entry.port_name, backend.ip, backend.port), None)
                self.maps[self.names.backends].delete(BACKEND_KEY.pack(backend_id))
                stats.map_updates += 1

    def contents(self) -> dict[Frontend, ServiceEntry]:
        """What the maps hold, read back from the kernel (for tests and inspect)."""
        probe = MapSync(self.maps, self.family)
        probe.adopt({}, clean=False)
        return {f: ServiceEntry("", i.entry.backends, i.entry.affinity_seconds, i.entry.external_stack)
                for f, i in probe.installed.items()}
