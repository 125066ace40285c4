"""The eBPF proxier's split of external traffic: with tc, the iptables side is fed exactly the Service ports tc
cannot serve, and removed when there are none (in-memory maps and a recording iptables side; no root)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Set
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.kernel.bpf import loader
from nodeagent.service.config import ProxyConfig
from nodeagent.service.conntrack import ConntrackReconciler, Filter, Flow
from nodeagent.service.ebpf import proxier as ebpf_proxier
from nodeagent.service.ebpf.desired import Frontend, TcGap
from nodeagent.service.ebpf.maps import MapSync
from nodeagent.service.ebpf.proxier import EbpfProxier, choose_external
from nodeagent.state.tracker import Snapshot
from tests.support.services import ep, service, slice_, snapshot_of
from tests.unit.service.ebpf.test_maps import memory_maps

CONFIG = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"))


class NoFlows:
    def flows(self, family: int, protocol: str = "udp") -> Iterable[Flow]:
        return ()

    def delete(self, family: int, match: Filter) -> int:
        return 0


class RecordingIptables:
    """The iptables side: what each sync was fed."""

    def __init__(self) -> None:
        self.ipt = object()
        self.fed: list[tuple[set[str], bool]] = []
        self.full_syncs_forced = 0

    def sync(self, snapshot: Snapshot, config: ProxyConfig, changed: Set[ObjectRef]) -> None:
        self.fed.append(({str(n) for n in snapshot.service_ports}, config.external_only))

    def force_full_sync(self) -> None:
        self.full_syncs_forced += 1

    def canaries_intact(self) -> bool:
        return True


@pytest.fixture
def cleaned(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    monkeypatch.setattr(loader, "attach", lambda datapath, cgroup: [])
    monkeypatch.setattr(ebpf_proxier.iptables_cleanup, "cleanup", lambda ipt: calls.append(ipt) or ["a rule"])
    return calls


def proxier(external: RecordingIptables, *, tc_active: bool) -> tuple[EbpfProxier, Any]:
    maps, _ = memory_maps()
    built = EbpfProxier("scope", Path("/sys/fs/cgroup/test"), external=external,  # type: ignore[arg-type]
                        datapath=loader.ServicePrograms("scope", Path("/nonexistent"), {}, True),
                        _maps=MapSync(maps), tc_active=tc_active, tc_interfaces=["eth0"],
                        conntrack=ConntrackReconciler(NoFlows()))
    return built, maps


def objects(*, local: bool) -> tuple[dict[str, Any], ...]:
    return (service("ns", "plain", "172.30.0.1", type_="NodePort", node_port=30001),
            slice_("ns", "plain", ep("10.0.0.1")),
            service("ns", "local", "172.30.0.2", type_="NodePort", node_port=30002,
                    externalTrafficPolicy="Local" if local else "Cluster"),
            slice_("ns", "local", ep("10.0.0.2", "test-node")))


def test_with_tc_iptables_is_fed_only_what_tc_lacks(cleaned: list[object]) -> None:
    external = RecordingIptables()
    node, maps = proxier(external, tc_active=True)
    report = node.sync(snapshot_of(*objects(local=True)), CONFIG, set())
    assert external.fed == [({"ns/local:p80"}, True)]
    on_iptables = {str(n): g for n, g in report.external_on_iptables.items()}
    assert on_iptables == {"ns/local:p80": (TcGap.EXTERNAL_POLICY_LOCAL,)}
    assert report.external_on_iptables_by_gap()[TcGap.EXTERNAL_POLICY_LOCAL] == 1
    gauges = report.gauges().external_on_iptables
    assert gauges["externalTrafficPolicy=Local"] == 1 and gauges["SCTP"] == 0, "every gap, zeros included"
    assert "ns/local:p80 (externalTrafficPolicy=Local)" in node.mode_detail
    contents = MapSync(maps).contents()
    assert contents[Frontend("192.168.0.2", 30002, 6)].external_stack
    assert not contents[Frontend("192.168.0.2", 30001, 6)].external_stack
    assert not cleaned


def test_with_nothing_left_for_iptables_its_rules_are_removed_once(cleaned: list[object]) -> None:
    external = RecordingIptables()
    node, _ = proxier(external, tc_active=True)
    node.sync(snapshot_of(*objects(local=True)), CONFIG, set())
    changed = {ObjectRef(Kind.SERVICE, "ns", "local")}
    node.sync(snapshot_of(*objects(local=False)), CONFIG, changed)  # a partial sync moves it to tc
    assert external.fed[1] == ({"ns/local:p80"}, True), "its rules stay while the map still flags it"
    assert cleaned == [external.ipt] and len(external.fed) == 2
    assert node.canaries_intact(), "no canary is expected while iptables holds nothing"
    node.sync(snapshot_of(*objects(local=False)), CONFIG, set())
    assert cleaned == [external.ipt], "removed once"
    node.sync(snapshot_of(*objects(local=True)), CONFIG, changed)
    assert external.fed[-1] == ({"ns/local:p80"}, True) and external.full_syncs_forced >= 2


def test_without_tc_iptables_serves_every_external_path(cleaned: list[object]) -> None:
    external = RecordingIptables()
    node, _ = proxier(external, tc_active=False)
    report = node.sync(snapshot_of(*objects(local=True)), CONFIG, set())
    assert external.fed == [({"ns/plain:p80", "ns/local:p80"}, True)]
    assert report.external_on_iptables == {}, "nothing is split: iptables serves all of it"
    assert report.gauges().external_on_iptables == {}, "not measured"


def test_a_port_gets_its_iptables_rules_before_tc_leaves_it_to_the_stack(cleaned: list[object]) -> None:
    external = RecordingIptables()
    node, maps = proxier(external, tc_active=True)
    node.sync(snapshot_of(*objects(local=False)), CONFIG, set())
    flagged_when_fed: list[bool] = []
    recorded = external.sync

    def sync(snapshot: Snapshot, config: ProxyConfig, changed: Set[ObjectRef]) -> None:
        flagged_when_fed.append(MapSync(maps).contents()[Frontend("192.168.0.2", 30002, 6)].external_stack)
        recorded(snapshot, config, changed)

    external.sync = sync  # type: ignore[method-assign]
    node.sync(snapshot_of(*objects(local=True)), CONFIG, {ObjectRef(Kind.SERVICE, "ns", "local")})
    assert flagged_when_fed == [False], "the rules exist before the flag is written"
    assert MapSync(maps).contents()[Frontend("192.168.0.2", 30002, 6)].external_stack


def test_the_split_is_a_gauge_per_missing_feature() -> None:
    from nodeagent.observability.metrics import AgentMetrics

    metrics = AgentMetrics()
    metrics.external_on_iptables.labels(str(TcGap.SOURCE_RANGES), "IPv4").set(2)
    value = metrics.registry.get_sample_value("nodeagent_ebpf_external_on_iptables_service_ports",
                                              {"lacks": "loadBalancerSourceRanges", "ip_family": "IPv4"})
    assert value == 2


def test_tc_goes_on_every_interface_with_a_routable_address_of_either_family() -> None:
    addresses = {
        "lo": [("AF_INET", "127.0.0.1", "255.0.0.0"), ("AF_INET6", "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")],
        "eth0": [("AF_INET", "192.0.2.2", "255.255.255.0"), ("AF_PACKET", "02:fc:00:00:00:01", None)],
        "eth1": [("AF_INET6", "fe80::1%eth1", "ffff:ffff:ffff:ffff::"),  # an IPv6-only uplink
                 ("AF_INET6", "2001:db8::5", "ffff:ffff:ffff:ffff::")],
        "lxc1": [("AF_INET", "10.244.1.1", "255.255.255.255"),  # a pod gateway: /32 and /128
                 ("AF_INET6", "fd00:10:244:1::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")],
        "veth9": [("AF_INET6", "fe80::9%veth9", "ffff:ffff:ffff:ffff::")],  # link-local only
        "odd": [("AF_INET6", "2001:db8::7", "not-a-mask")],
    }
    assert choose_external(addresses) == ["eth0", "eth1"]
