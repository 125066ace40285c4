"""tc's flow maps read as conntrack tables: the reconciler deletes the UDP flows tc keeps towards removed endpoints,
each with its reply entry, and leaves live ones, TCP and reply entries of others alone; na_ct for IPv4, na_ct6
(16-byte addresses) for IPv6, each read only by its family's reconciler."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from nodeagent.cluster.model import ObjectRef
from nodeagent.service.conntrack import ConntrackReconciler
from nodeagent.service.ebpf.flows import (
    CT_KEY,
    CT_KEY6,
    CT_VALUE,
    CT_VALUE6,
    LAYOUTS,
    NA_CT_FORWARD,
    NA_CT_REPLY_LOCAL,
    NA_CT_REPLY_SNAT,
    TcFlowTable,
    tc_flows,
)
from tests.support.services import ep, service, slice_, snapshot_of

UDP, TCP = 17, 6
NODE = "172.18.0.2"


class MemoryMap:
    """A BPF hash map in memory: raw keys and values, as MapHandle gives them."""

    def __init__(self) -> None:
        self.entries: dict[bytes, bytes] = {}

    def items(self) -> dict[bytes, bytes]:
        return dict(self.entries)

    def delete(self, key: bytes) -> bool:
        return self.entries.pop(key, None) is not None


def a(ip: str) -> bytes:
    return IPv4Address(ip).packed


def key(src: str, dst: str, sport: int, dport: int, proto: int, direction: int) -> bytes:
    return CT_KEY.pack(a(src), a(dst), sport, dport, proto, direction)


def value(ip1: str, port1: int, ip2: str = "0.0.0.0", port2: int = 0) -> bytes:
    return CT_VALUE.pack(a(ip1), port1, a(ip2), port2)


def flow_map() -> MemoryMap:
    """What nodeport_tc.c writes for three flows from outside to node1's NodePorts."""
    m = MemoryMap()
    # a UDP client sent to a backend on this node that has since been removed (no SNAT: a REPLY_LOCAL entry)
    m.entries[key("192.0.2.1", NODE, 40000, 30053, UDP, NA_CT_FORWARD)] = value("10.244.1.5", 53)
    m.entries[key("10.244.1.5", "192.0.2.1", 53, 40000, UDP, NA_CT_REPLY_LOCAL)] = value(NODE, 30053)
    # a UDP client sent to a live backend elsewhere, masqueraded as the node (a REPLY_SNAT entry)
    m.entries[key("192.0.2.2", NODE, 40001, 30053, UDP, NA_CT_FORWARD)] = value("10.244.2.7", 53, NODE, 40001)
    m.entries[key("10.244.2.7", NODE, 53, 40001, UDP, NA_CT_REPLY_SNAT)] = value("192.0.2.2", 40001, NODE, 30053)
    # a TCP client to a removed backend: kube-proxy's reconciler leaves TCP alone (the connection fails by itself)
    m.entries[key("192.0.2.3", NODE, 40002, 30080, TCP, NA_CT_FORWARD)] = value("10.244.1.9", 8080)
    return m


def test_forward_entries_read_as_flows_with_their_reply_keys() -> None:
    flows = {str(f.reply_src): f for f in tc_flows(flow_map().entries) if f.protocol == "udp"}
    assert sorted(flows) == ["10.244.1.5", "10.244.2.7"]
    assert {(f.orig_dst, f.orig_dst_port, f.reply_src_port) for f in flows.values()} == {
        (IPv4Address(NODE), 30053, 53)}
    assert flows["10.244.1.5"].reply_key == key("10.244.1.5", "192.0.2.1", 53, 40000, UDP, NA_CT_REPLY_LOCAL)
    assert flows["10.244.2.7"].reply_key == key("10.244.2.7", NODE, 53, 40001, UDP, NA_CT_REPLY_SNAT)


def test_stale_udp_flows_go_with_their_replies_and_live_ones_stay() -> None:
    snapshot = snapshot_of(
        service("kube-system", "dns", "10.96.0.10", type_="NodePort", node_port=30053, port_name="dns", port=53,
                protocol="UDP"),
        slice_("kube-system", "dns", ep("10.244.2.7", node="node2"), port=53, port_name="dns", protocol="UDP"),
        service("demo", "web", "10.96.0.20", type_="NodePort", node_port=30080, port_name="http", port=8080),
        slice_("demo", "web", ep("10.244.2.8", node="node2"), port=8080, port_name="http"),
        node="node1")
    m = flow_map()
    reconciler = ConntrackReconciler(TcFlowTable(m))
    done = reconciler.after_sync(snapshot.service_ports, snapshot.endpoints, set[ObjectRef]())
    assert done is not None and done.deleted == 1 and done.complete
    assert key("192.0.2.1", NODE, 40000, 30053, UDP, NA_CT_FORWARD) not in m.entries
    assert key("10.244.1.5", "192.0.2.1", 53, 40000, UDP, NA_CT_REPLY_LOCAL) not in m.entries
    assert key("192.0.2.2", NODE, 40001, 30053, UDP, NA_CT_FORWARD) in m.entries
    assert key("10.244.2.7", NODE, 53, 40001, UDP, NA_CT_REPLY_SNAT) in m.entries
    assert key("192.0.2.3", NODE, 40002, 30080, TCP, NA_CT_FORWARD) in m.entries


def test_only_ipv4_is_read() -> None:
    assert TcFlowTable(flow_map()).flows(6) == []


NODE6 = "fd00:172:18::2"


def a6(ip: str) -> bytes:
    return IPv6Address(ip).packed


def key6(src: str, dst: str, sport: int, dport: int, proto: int, direction: int) -> bytes:
    return CT_KEY6.pack(a6(src), a6(dst), sport, dport, proto, direction)


def value6(ip1: str, port1: int, ip2: str = "::", port2: int = 0) -> bytes:
    return CT_VALUE6.pack(a6(ip1), port1, a6(ip2), port2)


def flow_map6() -> MemoryMap:
    """What nodeport_tc.c's IPv6 path writes in na_ct6 for the same three flows over IPv6."""
    m = MemoryMap()
    m.entries[key6("2001:db8::1", NODE6, 40000, 30053, UDP, NA_CT_FORWARD)] = value6("fd00:10:1::5", 53)
    m.entries[key6("fd00:10:1::5", "2001:db8::1", 53, 40000, UDP, NA_CT_REPLY_LOCAL)] = value6(NODE6, 30053)
    m.entries[key6("2001:db8::2", NODE6, 40001, 30053, UDP, NA_CT_FORWARD)] = value6("fd00:10:2::7", 53, NODE6, 40001)
    m.entries[key6("fd00:10:2::7", NODE6, 53, 40001, UDP, NA_CT_REPLY_SNAT)] = value6("2001:db8::2", 40001,
                                                                                     NODE6, 30053)
    m.entries[key6("2001:db8::3", NODE6, 40002, 30080, TCP, NA_CT_FORWARD)] = value6("fd00:10:1::9", 8080)
    return m


def test_the_ipv6_layouts_are_the_c_structs() -> None:
    assert CT_KEY6.size == CT_VALUE6.size == 40, "struct ct_key6 / ct_val6: two 16-byte addresses, ports, pads"
    assert key6("::1", "::2", 1, 2, UDP, NA_CT_REPLY_SNAT)[32:] == bytes([0, 1, 0, 2, UDP, NA_CT_REPLY_SNAT, 0, 0])
    assert (LAYOUTS[6].map_name, LAYOUTS[4].map_name) == ("na_ct6", "na_ct")


def test_ipv6_forward_entries_read_as_flows_with_their_reply_keys() -> None:
    flows = {str(f.reply_src): f for f in tc_flows(flow_map6().entries, 6) if f.protocol == "udp"}
    assert sorted(flows) == ["fd00:10:1::5", "fd00:10:2::7"]
    assert {(f.orig_dst, f.orig_dst_port, f.reply_src_port) for f in flows.values()} == {
        (IPv6Address(NODE6), 30053, 53)}
    assert flows["fd00:10:1::5"].reply_key == key6("fd00:10:1::5", "2001:db8::1", 53, 40000, UDP, NA_CT_REPLY_LOCAL)
    assert flows["fd00:10:2::7"].reply_key == key6("fd00:10:2::7", NODE6, 53, 40001, UDP, NA_CT_REPLY_SNAT)


def test_stale_ipv6_udp_flows_go_with_their_replies_and_live_ones_stay() -> None:
    snapshot = snapshot_of(
        service("kube-system", "dns", "fd00:96::10", type_="NodePort", node_port=30053, port_name="dns", port=53,
                protocol="UDP", ipFamilies=["IPv6"]),
        dict(slice_("kube-system", "dns", ep("fd00:10:2::7", node="node2"), port=53, port_name="dns", protocol="UDP"),
             addressType="IPv6"),
        service("demo", "web", "fd00:96::20", type_="NodePort", node_port=30080, port_name="http", port=8080,
                ipFamilies=["IPv6"]),
        dict(slice_("demo", "web", ep("fd00:10:2::8", node="node2"), port=8080, port_name="http"), addressType="IPv6"),
        node="node1")
    m = flow_map6()
    reconciler = ConntrackReconciler(TcFlowTable(m, family=6), family=6)
    done = reconciler.after_sync(snapshot.service_ports, snapshot.endpoints, set[ObjectRef]())
    assert done is not None and done.deleted == 1 and done.complete and done.ip_family == "IPv6"
    assert key6("2001:db8::1", NODE6, 40000, 30053, UDP, NA_CT_FORWARD) not in m.entries
    assert key6("fd00:10:1::5", "2001:db8::1", 53, 40000, UDP, NA_CT_REPLY_LOCAL) not in m.entries
    assert key6("2001:db8::2", NODE6, 40001, 30053, UDP, NA_CT_FORWARD) in m.entries
    assert key6("fd00:10:2::7", NODE6, 53, 40001, UDP, NA_CT_REPLY_SNAT) in m.entries
    assert key6("2001:db8::3", NODE6, 40002, 30080, TCP, NA_CT_FORWARD) in m.entries


def test_each_family_s_table_answers_for_its_family_only() -> None:
    assert TcFlowTable(flow_map6(), family=6).flows(4) == []
    assert len(TcFlowTable(flow_map6(), family=6).flows(6)) == 2


def test_the_directions_are_the_c_enums() -> None:
    import re

    from nodeagent.kernel.bpf.loader import SOURCE_DIR

    text = (SOURCE_DIR / "lib" / "maps.h").read_text()
    declared = {name: int(v) for name, v in re.findall(r"^\s*(NA_CT_\w+) = (\d+),", text, re.MULTILINE)}
    assert declared == {"NA_CT_FORWARD": NA_CT_FORWARD, "NA_CT_REPLY_LOCAL": NA_CT_REPLY_LOCAL,
                        "NA_CT_REPLY_SNAT": NA_CT_REPLY_SNAT}
