"""The eBPF datapath's IPv6 side, pure: which IPv6 frontends a Service gets and with which backends
(`desired.plan(..., family=6)`), the bytes of the IPv6 maps (`MapSync(family=6)`), and the proxier's IPv6 side:
tc serves IPv6 from outside with the same gaps per port as IPv4, tc's IPv6 flows (na_ct6) are reconciled under
ip_family IPv6, and ip6tables is still fed every IPv6 external path (for the packets tc leaves to the stack)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from nodeagent.kernel.bpf import loader
from nodeagent.kernel.bpf.syscall import MapHandle
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Reconciled
from nodeagent.service.ebpf.desired import SERVICE_KEY6, Backend, Frontend, ServiceEntry, TcGap, plan
from nodeagent.service.ebpf.flows import CT_KEY6, CT_VALUE6, NA_CT_FORWARD, NA_CT_REPLY_LOCAL
from nodeagent.service.ebpf.maps import BACKEND_VALUE6, SERVICE_VALUE, SLOT_KEY, SLOT_VALUE, MapSync
from nodeagent.service.ebpf.proxier import IPV6_FALLBACK, EbpfProxier
from nodeagent.state.tracker import Snapshot
from tests.support.services import ep, service, slice_, snapshot_of
from tests.unit.service.ebpf.test_maps import MemoryMap
from tests.unit.service.ebpf.test_proxier import NoFlows, RecordingIptables, cleaned

__all__ = ["cleaned"]  # the fixture: iptables cleanup and cgroup attach recorded, not run

NODE = "test-node"
NODE_V4, NODE_V6 = ipaddress.ip_address("192.168.0.2"), ipaddress.ip_address("fd00:192::2")
TCP = 6


def v6_slice(name: str, *endpoints: dict[str, Any]) -> dict[str, Any]:
    made = slice_("ns", name, *endpoints)
    made["addressType"] = "IPv6"
    made["metadata"]["name"] = f"{name}-v6"
    return made


def dual(name: str, v4: str, v6: str, **spec: Any) -> dict[str, Any]:
    made = service("ns", name, v4, ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack", **spec)
    made["spec"]["clusterIPs"] = [v4, v6]
    return made


def snapshot() -> Snapshot:
    sticky = service("ns", "sticky", "fd00:172:30::42", ipFamilies=["IPv6"], sessionAffinity="ClientIP")
    weighted = service("ns", "weighted", "fd00:172:30::44", ipFamilies=["IPv6"])
    weighted["metadata"]["annotations"] = {"nodeagent.io/endpoint-weights": '{"a": 3, "c": 0}'}
    return snapshot_of(
        dual("web", "172.30.0.41", "fd00:172:30::41", type_="NodePort", node_port=30080,
             externalIPs=["192.168.99.1", "fd00:99::1"]),
        slice_("ns", "web", ep("10.0.0.1"), ep("10.0.0.2")),
        v6_slice("web", ep("fd00:10::1"), ep("fd00:10::2", ready=False)),
        sticky, v6_slice("sticky", ep("fd00:10::3")),
        weighted, v6_slice("weighted", *(dict(ep(ip), targetRef={"kind": "Pod", "name": name}) for ip, name in
                                         (("fd00:10::5", "a"), ("fd00:10::6", "b"), ("fd00:10::7", "c")))),
        service("ns", "only6", "fd00:172:30::46", ipFamilies=["IPv6"], type_="NodePort", node_port=30046),
        node=NODE)


def planned(family: int | None) -> Any:
    current = snapshot()
    return plan(current.service_ports, current.endpoints, node_ips=[NODE_V4, NODE_V6], family=family)


def test_each_family_gets_its_own_frontends_with_its_own_endpoints() -> None:
    six, four = planned(6).entries, planned(4).entries
    assert {f.family for f in six} == {6} and {f.family for f in four} == {4}
    assert six[Frontend("fd00:172:30::41", 80, TCP)].backends == (Backend("fd00:10::1", 80),), "ready ones only"
    assert four[Frontend("172.30.0.41", 80, TCP)].backends == (Backend("10.0.0.1", 80), Backend("10.0.0.2", 80))
    # the NodePort on the node's address of each family; external IPs of each family
    assert {Frontend("fd00:192::2", 30080, TCP), Frontend("fd00:99::1", 80, TCP)} <= six.keys()
    assert {Frontend("192.168.0.2", 30080, TCP), Frontend("192.168.99.1", 80, TCP)} <= four.keys()
    assert planned(None).entries == {**four, **six}, "both families, when none is named"


def test_an_ipv6_only_service_has_no_ipv4_frontend_as_kube_proxys_ipv4_proxier_skips_it() -> None:
    assert Frontend("fd00:192::2", 30046, TCP) in planned(6).entries
    assert not any(f.port == 30046 for f in planned(4).entries), "no IPv4 NodePort for an IPv6-only Service"


def test_affinity_and_weights_as_for_ipv4() -> None:
    six = planned(6).entries
    assert six[Frontend("fd00:172:30::42", 80, TCP)].affinity_seconds == 10800
    assert six[Frontend("fd00:172:30::44", 80, TCP)].backends == (Backend("fd00:10::5", 80, 3),
                                                                  Backend("fd00:10::6", 80, 1))


def test_tc_serves_ipv6_external_frontends_that_lack_nothing() -> None:
    result = planned(6)
    flagged = {f for f, e in result.entries.items() if e.external_stack}
    assert flagged == {Frontend("fd00:192::2", 30046, TCP)}, "only the IPv6-only NodePort without endpoints"
    assert not result.entries[Frontend("fd00:192::2", 30080, TCP)].external_stack
    assert not result.entries[Frontend("fd00:99::1", 80, TCP)].external_stack
    gaps = {str(name): found for name, found in result.external_stack.items()}
    assert gaps == {"ns/only6:p80": (TcGap.NO_ENDPOINTS,)}
    assert not planned(4).external_stack, "the IPv4 side of the same port stays on tc"
    assert {str(n): g for n, g in planned(None).external_stack.items()} == gaps
    assert "IPv6" not in {str(g) for g in TcGap}, "IPv6 itself is no longer something tc lacks"


NO_ENDPOINT = object()  # the case's v6 slice is left out


@pytest.mark.parametrize(("spec", "expected"), [
    ({"externalTrafficPolicy": "Local"}, (TcGap.EXTERNAL_POLICY_LOCAL,)),
    ({"type_": "LoadBalancer", "loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8::/64"]},
     (TcGap.SOURCE_RANGES,)),
    ({"sessionAffinity": "ClientIP"}, (TcGap.SESSION_AFFINITY,)),
    ({"protocol": "SCTP"}, (TcGap.SCTP,)),
    ({"masquerade_all": True}, (TcGap.MASQUERADE_ALL,)),
    ({NO_ENDPOINT: True}, (TcGap.NO_ENDPOINTS,)),
    ({}, ()),
], ids=["local", "source-ranges", "affinity", "sctp", "masquerade-all", "no-endpoints", "plain"])
def test_each_family_has_the_same_gaps(spec: dict[Any, Any], expected: tuple[TcGap, ...]) -> None:
    """A dual-stack NodePort (load-balancer IPs of both families for the LoadBalancer case): each family's plan
    names exactly the gaps of the other."""
    options = dict(spec)
    masquerade_all = bool(options.pop("masquerade_all", False))
    no_endpoints = bool(options.pop(NO_ENDPOINT, False))
    protocol = options.pop("protocol", "TCP")
    kind = options.pop("type_", "NodePort")
    made = dual("gap", "172.30.0.61", "fd00:172:30::61", type_=kind, node_port=30061, protocol=protocol, **options)
    if kind == "LoadBalancer":
        made["status"] = {"loadBalancer": {"ingress": [{"ip": "192.168.99.9"}, {"ip": "fd00:99::9"}]}}
    slices = () if no_endpoints else (slice_("ns", "gap", ep("10.0.0.1", NODE), protocol=protocol),
                                      v6_slice("gap", ep("fd00:10::1", NODE)))
    for made_slice in slices:
        made_slice["ports"][0]["protocol"] = protocol
    current = snapshot_of(made, *slices, node=NODE)
    gaps = {family: plan(current.service_ports, current.endpoints, node_ips=[NODE_V4, NODE_V6],
                         masquerade_all=masquerade_all, family=family).external_stack for family in (4, 6)}
    assert {str(n): g for n, g in gaps[6].items()} == {str(n): g for n, g in gaps[4].items()}
    assert tuple(g for found in gaps[6].values() for g in found) == expected


def test_an_ipv6_frontend_is_the_c_struct_svc_key6() -> None:
    frontend = Frontend("fd00:172:30::41", 443, 17)
    assert frontend.key == socket.inet_pton(socket.AF_INET6, "fd00:172:30::41") + bytes([0x01, 0xBB, 17, 0])
    assert len(frontend.key) == SERVICE_KEY6.size == 20
    assert Frontend.from_key(frontend.key) == frontend
    assert str(frontend) == "[fd00:172:30::41]:443/UDP"


def memory_maps6() -> dict[str, MemoryMap]:
    journal: list[tuple[str, str, bytes]] = []
    return {n: MemoryMap(n, journal) for n in ("na_services6", "na_slots6", "na_backends6")}


def test_the_ipv6_maps_hold_the_c_structs_and_are_adopted_back() -> None:
    maps = memory_maps6()
    frontend = Frontend("fd00:172:30::41", 53, 17)
    desired = {frontend: ServiceEntry("ns/svc:dns", (Backend("fd00:10::7", 53, 3),), 30)}
    MapSync(maps, family=6).apply(desired)  # type: ignore[arg-type]
    backend_key = (1).to_bytes(4, sys.byteorder)
    assert maps["na_backends6"].data == {
        backend_key: socket.inet_pton(socket.AF_INET6, "fd00:10::7") + bytes([0, 53, 0, 0])}
    assert BACKEND_VALUE6.size == 20
    assert maps["na_services6"].data == {frontend.key: SERVICE_VALUE.pack(1, 1, 3, 30, 0)}
    assert maps["na_slots6"].data == {SLOT_KEY.pack(1, 0): SLOT_VALUE.pack(1, 3)}
    restarted = MapSync(maps, family=6)  # type: ignore[arg-type]
    restarted.adopt(desired)
    assert restarted.apply(desired).map_updates == 0
    assert restarted.contents() == {frontend: ServiceEntry("", desired[frontend].backends, 30)}


def test_a_family_s_maps_refuse_the_other_family_s_frontends() -> None:
    with pytest.raises(ValueError, match="IPv4 maps were given IPv6 frontends"):
        MapSync({}).apply({Frontend("fd00::1", 80, TCP): ServiceEntry("ns/a:p", ())})


def ipv6_side(external: RecordingIptables) -> tuple[EbpfProxier, dict[str, MemoryMap]]:
    maps = memory_maps6()
    four = EbpfProxier("scope", Path("/sys/fs/cgroup/test"), tc_active=True, tc_interfaces=["eth0"],
                       datapath=loader.ServicePrograms("scope", Path("/nonexistent"), maps, True),  # type: ignore[arg-type]
                       conntrack=ConntrackReconciler(NoFlows()))
    side = four.ipv6_side(external)  # type: ignore[arg-type]
    side.conntrack = ConntrackReconciler(NoFlows())
    return side, maps


def test_the_ipv6_side_with_tc_reports_only_real_gaps_and_keeps_ip6tables_fed(cleaned: list[object]) -> None:
    external = RecordingIptables()
    side, maps = ipv6_side(external)
    assert side.tc_active and side.tc_interfaces == ["eth0"], "tc's state is the IPv4 side's: one program set"
    config = ProxyConfig(node_name=NODE, node_ip=NODE_V6, family=6)
    report = side.sync(snapshot(), config, set())
    # every port's external paths, not only the gaps': the rules serve what tc leaves to the stack
    assert external.fed == [({str(n) for n in snapshot().service_ports}, True)], "ip6tables: external paths only"
    assert {str(n): g for n, g in report.external_on_iptables.items()} == {"ns/only6:p80": (TcGap.NO_ENDPOINTS,)}
    gauges = report.gauges()
    assert gauges.external_on_iptables[str(TcGap.NO_ENDPOINTS)] == 1
    assert gauges.external_on_iptables[str(TcGap.EXTERNAL_POLICY_LOCAL)] == 0, "every gap, zeros included"
    assert "IPv6" not in gauges.external_on_iptables
    assert set(gauges.map_entries) == {"na_services6", "na_backends6"}
    assert "tc on eth0" in side.mode_detail and IPV6_FALLBACK in side.mode_detail and "connect6" in side.mode_detail
    assert "ns/only6:p80 (no endpoints (reject))" in side.mode_detail
    written = MapSync(maps, family=6).contents()  # type: ignore[arg-type]
    assert Frontend("fd00:172:30::41", 80, TCP) in written and all(f.family == 6 for f in written)
    assert not written[Frontend("fd00:192::2", 30080, TCP)].external_stack, "tc serves the IPv6 NodePort"
    assert written[Frontend("fd00:192::2", 30046, TCP)].external_stack
    side.sync(snapshot(), config, set())
    assert len(external.fed) == 2, "one ip6tables sync per sync (no second pass for a changed split)"
    assert not cleaned, "the ip6tables rules are never removed"


def test_the_ipv6_side_without_tc_leaves_all_external_traffic_to_ip6tables(cleaned: list[object]) -> None:
    external = RecordingIptables()
    four = EbpfProxier("scope", Path("/sys/fs/cgroup/test"), tc_active=False, tc_interfaces=["eth0"],
                       datapath=loader.ServicePrograms("scope", Path("/nonexistent"), memory_maps6(), True),  # type: ignore[arg-type]
                       conntrack=ConntrackReconciler(NoFlows()))
    side = four.ipv6_side(external)  # type: ignore[arg-type]
    side.conntrack = ConntrackReconciler(NoFlows())
    report = side.sync(snapshot(), ProxyConfig(node_name=NODE, node_ip=NODE_V6, family=6), set())
    assert side.tc_flows is None and external.fed == [({str(n) for n in snapshot().service_ports}, True)]
    assert report.external_on_iptables == {} and report.gauges().external_on_iptables == {}, "nothing split"
    assert "ip6tables (tc unavailable)" in side.mode_detail


def test_the_ipv6_side_deletes_tc_s_ipv6_flows_to_a_removed_endpoint(cleaned: list[object],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """na_ct6 is opened with its own layout and reconciled by the IPv6 side, reported under ip_family IPv6."""
    client, gone, live = "2001:db8::1", "fd00:10::9", "fd00:10::1"
    flows = MemoryMap("na_ct6", [])
    forward = CT_KEY6.pack(ipaddress.ip_address(client).packed, NODE_V6.packed, 40000, 30080, 17, NA_CT_FORWARD)
    reply = CT_KEY6.pack(ipaddress.ip_address(gone).packed, ipaddress.ip_address(client).packed, 80, 40000, 17,
                         NA_CT_REPLY_LOCAL)
    flows.data = {forward: CT_VALUE6.pack(ipaddress.ip_address(gone).packed, 80, bytes(16), 0),
                  reply: CT_VALUE6.pack(NODE_V6.packed, 30080, bytes(16), 0)}
    opened: list[tuple[str, int, int]] = []

    def pinned(path: str, key: int, value: int) -> MemoryMap:
        opened.append((Path(path).name, key, value))
        return flows

    class Observed(RecordingIptables):
        def observe_conntrack(self, observer: object) -> None:
            pass

    monkeypatch.setattr(MapHandle, "pinned", staticmethod(pinned))
    side, _ = ipv6_side(Observed())
    assert opened == [("na_ct6", 40, 40)]
    seen: list[Reconciled] = []
    side.observe_conntrack(seen.append)
    dns = service("ns", "dns", "fd00:172:30::53", ipFamilies=["IPv6"], type_="NodePort", node_port=30080,
                  protocol="UDP")
    endpoints = v6_slice("dns", ep(live))
    endpoints["ports"][0]["protocol"] = "UDP"
    current = snapshot_of(dns, endpoints, node=NODE)
    assert [{str(e.ip) for e in found} for found in current.endpoints.values()] == [{live}]
    side.sync(current, ProxyConfig(node_name=NODE, node_ip=NODE_V6, family=6), set())
    assert flows.data == {}, "the flow to the removed endpoint went, with its reply entry"
    assert [(r.ip_family, r.deleted) for r in seen] == [("IPv6", 1)]


def test_the_agent_publishes_the_ipv6_side_s_maps_and_split_beside_the_ipv4_ones(cleaned: list[object]) -> None:
    from nodeagent.cluster.model import Kind
    from nodeagent.daemon.agent import Agent, AgentOptions
    from tests.support.events import listed
    from tests.unit.service.ebpf.test_maps import memory_maps

    class Observed(RecordingIptables):
        def observe_conntrack(self, observer: object) -> None:
            pass

    maps4, _ = memory_maps()
    maps = {**maps4, **memory_maps6()}
    four = EbpfProxier("scope", Path("/sys/fs/cgroup/test"), external=Observed(),  # type: ignore[arg-type]
                       datapath=loader.ServicePrograms("scope", Path("/nonexistent"), maps, True),
                       _maps=MapSync(maps), tc_active=True, tc_interfaces=["eth0"],
                       conntrack=ConntrackReconciler(NoFlows()))
    six = four.ipv6_side(Observed())  # type: ignore[arg-type]
    six.conntrack = ConntrackReconciler(NoFlows())
    six.tc_flows = None  # no pinned na_ct6 here

    class NoSource:
        def start(self) -> NoSource:
            return self

        def stop(self) -> None:
            pass

    agent = Agent(AgentOptions(NODE, healthz_port=None), lambda sink: NoSource(), four, addresses=lambda: (),
                  read_nfacct=None, ipv6_proxier=six)
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in (str(NODE_V4), str(NODE_V6))]}}
    web = dual("web", "172.30.0.41", "fd00:172:30::41", type_="NodePort", node_port=30080)
    agent._received(listed(Kind.NODE, [node], "1"))
    agent._received(listed(Kind.SERVICE, [web], "1"))
    agent._received(listed(Kind.ENDPOINT_SLICE, [slice_("ns", "web", ep("10.0.0.1"))], "1"))  # none of IPv6
    agent._sync()

    def value(name: str, **labels: str) -> float | None:
        return agent.metrics.registry.get_sample_value(name, labels)

    assert value("nodeagent_sync_proxy_map_entries", map="na_services6") == 2  # cluster IP and NodePort
    assert value("nodeagent_sync_proxy_map_entries", map="na_services") == 2
    # each family's gaps under its own ip_family: the IPv6 NodePort has no IPv6 endpoint, the IPv4 one has one
    gauge = "nodeagent_ebpf_external_on_iptables_service_ports"
    assert value(gauge, lacks=str(TcGap.NO_ENDPOINTS), ip_family="IPv6") == 1
    assert value(gauge, lacks=str(TcGap.NO_ENDPOINTS), ip_family="IPv4") == 0


def test_compare_modes_puts_both_families_of_a_port_on_tc() -> None:
    from nodeagent.service.compare import ExternalPath, compare_modes

    current = snapshot()
    ports = {str(p.port): p for p in compare_modes(current.service_ports, current.endpoints,
                                                   node_ips=[NODE_V4, NODE_V6])}
    web, only6 = ports["ns/web:p80"], ports["ns/only6:p80"]
    assert web.external_path is ExternalPath.TC and web.gaps == ()
    assert "[fd00:192::2]:30080/TCP" in web.external_frontends and "192.168.0.2:30080/TCP" in web.external_frontends
    assert any("connect6" in d and "na_ct6" in d for d in web.differences)
    assert only6.external_path is ExternalPath.IPTABLES and only6.gaps == (TcGap.NO_ENDPOINTS,)
