"""Desired map entries (pure) and the map writer's ordering, against in-memory maps (no root, no bcc)."""

from __future__ import annotations

import socket
import sys
from typing import Any

from nodeagent.cluster.decode import decode
from nodeagent.service.ebpf.desired import SERVICE_KEY, Backend, Frontend, ServiceEntry, desired_entries
from nodeagent.service.ebpf.maps import BACKEND_VALUE, SERVICE_VALUE, SLOT_KEY, SLOT_VALUE, MapSync
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of


class MemoryMap:
    """A map handle over a dict, recording every operation in one shared journal."""

    def __init__(self, name: str, journal: list[tuple[str, str, bytes]]) -> None:
        self.name, self.journal = name, journal
        self.data: dict[bytes, bytes] = {}

    def update(self, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self.journal.append(("update", self.name, key))

    def delete(self, key: bytes) -> bool:
        self.journal.append(("delete", self.name, key))
        return self.data.pop(key, None) is not None

    def items(self) -> dict[bytes, bytes]:
        return dict(self.data)


def memory_maps() -> tuple[dict[str, Any], list[tuple[str, str, bytes]]]:
    journal: list[tuple[str, str, bytes]] = []
    return {n: MemoryMap(n, journal) for n in ("na_services", "na_slots", "na_backends")}, journal


def entries(*objects: dict[str, Any]) -> Any:
    snapshot = snapshot_of(*objects)
    return desired_entries(snapshot.service_ports, snapshot.endpoints, node_ips=[],
                           node_labels={})


def test_frontends_follow_kube_proxys_policies_for_local_clients() -> None:
    import ipaddress

    snapshot = snapshot_of(*OVERALL_OBJECTS)
    desired = desired_entries(snapshot.service_ports, snapshot.endpoints,
                              node_ips=[ipaddress.ip_address("192.168.0.2")])
    # svc2: LoadBalancer, eTP Local, its only endpoint is remote: pods and the host still reach it
    assert desired[Frontend("1.2.3.4", 80, 6)].backends == (Backend("10.180.0.2", 80),)
    assert desired[Frontend("192.168.0.2", 3001, 6)].backends == (Backend("10.180.0.2", 80),)
    assert desired[Frontend("172.30.0.46", 80, 6)].backends == (), "no endpoints: refuse"
    assert desired[Frontend("172.30.0.45", 80, 6)].affinity_seconds == 10800


def test_weights_come_from_the_annotation_and_zero_removes_an_endpoint() -> None:
    svc = service("ns1", "svc1", "172.30.0.41")
    svc["metadata"]["annotations"] = {"nodeagent.io/endpoint-weights": '{"a": 3, "c": 0}'}
    endpoints = [dict(ep(ip), targetRef={"kind": "Pod", "name": name})
                 for ip, name in (("10.180.0.1", "a"), ("10.180.0.2", "b"), ("10.180.0.3", "c"))]
    desired = entries(svc, slice_("ns1", "svc1", *endpoints))
    assert desired[Frontend("172.30.0.41", 80, 6)].backends == (Backend("10.180.0.1", 80, 3),
                                                                Backend("10.180.0.2", 80, 1))
    svc["metadata"]["annotations"] = {"nodeagent.io/endpoint-weights": '{"a": -1}'}
    assert [r.field for r in decode(svc).rejections] == ["metadata.annotations[nodeagent.io/endpoint-weights]"]


def test_the_entries_bytes_are_the_c_structs() -> None:
    """The bytes of bpf-src/lib/maps.h's structs (tests/integration/test_bpf_layouts.py compares the layouts with
    bcc's): addresses and ports in network order, counters in host order, pads zero."""
    sizes = (SERVICE_KEY.size, SERVICE_VALUE.size, SLOT_KEY.size, SLOT_VALUE.size, BACKEND_VALUE.size)
    assert sizes == (8, 20, 8, 8, 8)
    frontend = Frontend("10.96.0.1", 443, 17)
    assert frontend.key == socket.inet_aton("10.96.0.1") + bytes([0x01, 0xBB, 17, 0])
    assert Frontend.from_key(frontend.key) == frontend
    maps, _ = memory_maps()
    sync = MapSync(maps)
    sync.apply({frontend: ServiceEntry("ns/svc:dns", (Backend("10.1.0.7", 53, 3),), 30)})
    backend_key = (1).to_bytes(4, sys.byteorder)  # a u32 id in host order
    assert maps["na_backends"].data == {backend_key: socket.inet_aton("10.1.0.7") + bytes([0, 53, 0, 0])}
    assert maps["na_services"].data == {frontend.key: SERVICE_VALUE.pack(1, 1, 3, 30, 0)}
    assert maps["na_slots"].data == {SLOT_KEY.pack(1, 0): SLOT_VALUE.pack(1, 3)}


def test_a_changed_backend_set_is_written_beside_the_old_one_then_switched() -> None:
    maps, journal = memory_maps()
    sync = MapSync(maps)
    frontend = Frontend("172.30.0.41", 80, 6)
    first = entries(service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", ep("10.180.0.1"), ep("10.180.0.2")))
    sync.apply(first)
    journal.clear()
    second = entries(service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", ep("10.180.0.2"), ep("10.180.0.3")))
    stats = sync.apply(second)
    switch = journal.index(("update", "na_services", frontend.key))
    assert all(op == "update" for op, name, _ in journal[:switch]), "only additions before the switch"
    assert [name for op, name, _ in journal[:switch]] == ["na_backends", "na_slots", "na_slots"]
    assert all(op == "delete" for op, _, _ in journal[switch + 1:]), "only removals after it"
    assert stats.written == 1 and len(maps["na_backends"].data) == 2, "10.180.0.1's backend is gone"
    assert len(maps["na_slots"].data) == 2, "the old version's slots are gone"


def test_adopting_the_maps_writes_only_the_difference() -> None:
    maps, journal = memory_maps()
    desired = entries(*OVERALL_OBJECTS)
    MapSync(maps).apply(desired)
    journal.clear()
    restarted = MapSync(maps)
    restarted.adopt(desired)
    assert restarted.apply(desired).map_updates == 0 and journal == []
    assert restarted.contents() == {f: type(e)("", e.backends, e.affinity_seconds, e.external_stack)
                                    for f, e in desired.items()}
    assert any(e.external_stack for e in desired.values()), "the flag is written and read back too"
