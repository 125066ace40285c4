"""The iptables renderer against kube-proxy's own expectations.

The expected rule sets are kube-proxy's (pkg/proxy/iptables/proxier_test.go, TestOverallIPTablesRules
and the tests named below), for the same Services and EndpointSlices, under the same flags as its
fake proxier: node `test-node` at 192.168.0.2, cluster CIDR 10.0.0.0/8, mark 0x4000, nfacct on.
They were not produced by this code; they are compared after kube-proxy's own test sort.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.service.config import ProxyConfig
from nodeagent.service.iptables import names
from nodeagent.service.iptables.render import probability, render
from nodeagent.state.tracker import Snapshot
from tests.support.iptables_dump import sort_rules
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

FAKE_PROXIER = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                           cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), masquerade_mark="0x4000",
                           nfacct=True)










def rules(snapshot: Snapshot, config: ProxyConfig = FAKE_PROXIER, **kwargs: Any) -> str:
    return render(snapshot.service_ports, snapshot.endpoints, config, **kwargs).text()


def assert_rules(actual: str, expected: str) -> None:
    assert sort_rules(actual).splitlines() == sort_rules(dedent(expected)).splitlines()



OVERALL_EXPECTED = (Path(__file__).parents[4] / "tests" / "golden" / "kube-proxy-overall.rules").read_text()


def test_overall_rules_equal_kube_proxys() -> None:
    """TestOverallIPTablesRules: ClusterIP, LB eTP=Local, NodePort, externalIPs, LB with source ranges and
    affinity, and a Service without endpoints."""
    assert_rules(rules(snapshot_of(*OVERALL_OBJECTS)), OVERALL_EXPECTED)


def test_chain_names_are_kube_proxys_hashes() -> None:
    assert names.cluster_chain("ns1/svc1:p80", "tcp") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert names.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert names.firewall_chain("ns5/svc5:p80", "tcp") == "KUBE-FW-NUKIZ6OKUXPJNT4C"


@pytest.mark.parametrize(("count", "expected"), [(2, "0.5000000000"), (3, "0.3333333333"), (7, "0.1428571429")])
def test_probabilities_have_kube_proxys_ten_decimals(count: int, expected: str) -> None:
    assert probability(count) == expected


def test_output_is_byte_stable_across_renders() -> None:
    snapshot = snapshot_of(*OVERALL_OBJECTS)
    assert rules(snapshot) == rules(snapshot)


# --- behaviours of kube-proxy's syncProxyRules / CategorizeEndpoints, one at a time -----------------

def nat_rules(text: str) -> list[str]:
    return [line for line in text.split("*nat", 1)[1].splitlines() if line.startswith("-A ")]


def filter_rules(text: str) -> list[str]:
    return [line for line in text.split("*nat", 1)[0].splitlines() if line.startswith("-A ")]


SVC1 = names.cluster_chain("ns1/svc1:p80", "tcp")
SVL1 = names.local_chain("ns1/svc1:p80", "tcp")


def test_internal_traffic_policy_local_without_local_endpoints_drops_cluster_ip_traffic() -> None:
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41", internalTrafficPolicy="Local"),
                             slice_("ns1", "svc1", ep("10.180.0.1", node="other-node"))))
    assert ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp '
            "-d 172.30.0.41 --dport 80 -j DROP") in filter_rules(text)
    assert not [r for r in nat_rules(text) if "172.30.0.41" in r]


def test_internal_traffic_policy_local_uses_only_local_endpoints() -> None:
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41", internalTrafficPolicy="Local"),
                             slice_("ns1", "svc1", ep("10.180.0.1", node="other-node"),
                                    ep("10.180.0.2", node="test-node"))))
    assert any(r.endswith(f"-j {SVL1}") and r.startswith("-A KUBE-SERVICES") for r in nat_rules(text))
    assert [r for r in nat_rules(text) if r.startswith(f"-A {SVL1}") and "-j KUBE-SEP" in r] == [
        f'-A {SVL1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" '
        f"-j {names.endpoint_chain('ns1/svc1:p80', 'tcp', '10.180.0.2:80')}"]
    assert SVC1 not in text, "no Cluster-policy chain when nothing uses it"


def test_serving_terminating_endpoints_are_used_only_when_none_is_ready() -> None:
    terminating = ep("10.180.0.1", ready=False, serving=True, terminating=True)
    not_serving = ep("10.180.0.2", ready=False, serving=False, terminating=True)
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", terminating, not_serving)))
    assert [r for r in nat_rules(text) if r.startswith(f"-A {SVC1}") and "-j KUBE-SEP" in r] == [
        f'-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        f"-j {names.endpoint_chain('ns1/svc1:p80', 'tcp', '10.180.0.1:80')}"]
    with_ready = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41"),
                                   slice_("ns1", "svc1", terminating, ep("10.180.0.3"))))
    assert "10.180.0.1:80" not in with_ready and "10.180.0.3:80" in with_ready


def test_masquerade_all_and_no_cluster_cidr() -> None:
    snapshot = snapshot_of(service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", ep("10.180.0.1")))
    every = rules(snapshot, ProxyConfig(node_name="test-node", masquerade_all=True, masquerade_mark="0x4000"))
    assert (f'-A {SVC1} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 '
            "-j KUBE-MARK-MASQ") in nat_rules(every)
    neither = rules(snapshot, ProxyConfig(node_name="test-node", masquerade_mark="0x4000"))
    assert not [r for r in nat_rules(neither) if r.startswith(f"-A {SVC1}") and "KUBE-MARK-MASQ" in r]


def test_kube_proxys_own_mark_format_is_the_default() -> None:
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), ProxyConfig(node_name="n"))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000" in nat_rules(text)


def test_large_clusters_drop_per_endpoint_comments() -> None:
    endpoints = [ep(f"10.180.{i // 250}.{i % 250 + 1}") for i in range(1001)]
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", *endpoints)))
    sep_rules = [r for r in nat_rules(text) if r.startswith("-A KUBE-SEP-")]
    assert len(sep_rules) == 2002 and not [r for r in sep_rules if "--comment" in r]
    assert not [r for r in nat_rules(text) if r.startswith(f"-A {SVC1}") and "-> " in r]
    small = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", *endpoints[:1000])))
    assert all("--comment" in r for r in nat_rules(small) if r.startswith("-A KUBE-SEP-"))


def test_nodeport_addresses_replace_the_local_address_match() -> None:
    config = ProxyConfig(node_name="n", masquerade_mark="0x4000",
                         nodeport_ips=(ipaddress.ip_address("192.168.0.2"), ipaddress.ip_address("127.0.0.1")))
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), config)
    tail = [r for r in nat_rules(text) if "must be the last rule" in r]
    assert [r.split(" -d ")[1] for r in tail] == ["192.168.0.2 -j KUBE-NODEPORTS", "127.0.0.1 -j KUBE-NODEPORTS"]
    no_localhost = ProxyConfig(node_name="n", localhost_nodeports=False)
    tail = [r for r in nat_rules(rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), no_localhost))
            if "must be the last rule" in r]
    assert tail[0].endswith("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS")
    assert "KUBE-FIREWALL" not in rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), no_localhost)


def test_zone_hints_keep_traffic_in_the_zone_when_every_endpoint_has_one() -> None:
    def hinted(ip: str, zone: str) -> dict[str, Any]:
        return {**ep(ip), "hints": {"forZones": [{"name": zone}]}}

    config = ProxyConfig(node_name="test-node", masquerade_mark="0x4000",
                         node_labels={"topology.kubernetes.io/zone": "a"})
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41"),
                             slice_("ns1", "svc1", hinted("10.180.0.1", "a"), hinted("10.180.0.2", "b"))), config)
    assert "10.180.0.1:80" in text and "10.180.0.2:80" not in text
    unhinted = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41"),
                                 slice_("ns1", "svc1", hinted("10.180.0.1", "a"), ep("10.180.0.2"))), config)
    assert "10.180.0.2:80" in unhinted, "one endpoint without a hint: hints are ignored"


def test_partial_render_writes_only_changed_services_but_keeps_every_chain_active() -> None:
    snapshot = snapshot_of(*OVERALL_OBJECTS)
    full = render(snapshot.service_ports, snapshot.endpoints, FAKE_PROXIER)
    partial = render(snapshot.service_ports, snapshot.endpoints, FAKE_PROXIER,
                     partial={ObjectRef(Kind.SERVICE, "ns1", "svc1")})
    assert partial.active_nat_chains == full.active_nat_chains
    written = {c for c in partial.nat.chains if names.is_service_chain(c)}
    assert written == {SVC1, names.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80")}
    assert [r for r in partial.nat.rules if r.startswith("-A KUBE-SERVICES")] == [
        r for r in full.nat.rules if r.startswith("-A KUBE-SERVICES")], "top-level chains are always complete"
    assert partial.delete_stale([*full.active_nat_chains, "KUBE-SVC-GONE", "OTHER-CHAIN"]) == ["KUBE-SVC-GONE"]


def test_udp_flows_to_removed_endpoints_and_of_rejected_services_are_flushed() -> None:
    from nodeagent.service.iptables.proxier import stale_udp_flows

    before = snapshot_of(service("ns1", "dns", "172.30.0.10", protocol="UDP", port=53, type_="NodePort",
                                 node_port=30053),
                         slice_("ns1", "dns", ep("10.180.0.1"), ep("10.180.0.2"), port=53, protocol="UDP"))
    after = snapshot_of(service("ns1", "dns", "172.30.0.10", protocol="UDP", port=53, type_="NodePort",
                                node_port=30053),
                        slice_("ns1", "dns", ep("10.180.0.2"), port=53, protocol="UDP"))
    flows = stale_udp_flows(before.service_ports, before.endpoints, after.service_ports, after.endpoints, None)
    assert flows == [["-D", "-p", "udp", "--orig-dst", "172.30.0.10", "--orig-port-dst", "53",
                      "--dst-nat", "10.180.0.1"],
                     ["-D", "-p", "udp", "--orig-port-dst", "30053", "--dst-nat", "10.180.0.1"]]
    empty = snapshot_of(service("ns1", "dns", "172.30.0.10", protocol="UDP", port=53))
    revived = stale_udp_flows(empty.service_ports, empty.endpoints, after.service_ports, after.endpoints, None)
    assert revived == [["-D", "-p", "udp", "--orig-dst", "172.30.0.10", "--orig-port-dst", "53"]]
    assert stale_udp_flows(before.service_ports, before.endpoints, after.service_ports, after.endpoints, set()) == []
