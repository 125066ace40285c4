"""The iptables renderer against kube-proxy's own expectations.

The expected rule sets are kube-proxy's (pkg/proxy/iptables/proxier_test.go, TestOverallIPTablesRules
and the tests named below), for the same Services and EndpointSlices, under the same flags as its
fake proxier: node `test-node` at 192.168.0.2, cluster CIDR 10.0.0.0/8, mark 0x4000, nfacct on.
They were not produced by this code; they are compared after kube-proxy's own test sort.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from nodeagent.cluster.model import Kind, ObjectRef
from nodeagent.service.config import (
    CT_STATE_INVALID_DROPPED,
    LOCALHOST_NODEPORTS_ACCEPTED,
    NFACCT_COUNTERS,
    ProxyConfig,
    ProxySettings,
    node_ips,
    proxy_config,
)
from nodeagent.service.iptables import names
from nodeagent.service.iptables.render import probability, render
from nodeagent.state.tracker import Snapshot
from tests.support import objects as k8s
from tests.support.iptables_dump import sort_rules
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

FAKE_PROXIER = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                           cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), masquerade_mark="0x4000",
                           nfacct_counters=frozenset(NFACCT_COUNTERS))










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


# kube-proxy's TestNodePorts fake network: lo and eth0 of the node.
NODE_INTERFACES = tuple(ipaddress.ip_address(ip) for ip in (
    "127.0.0.1", "::1", "192.168.0.2", "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2"))
TAIL = '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in ' \
       'this chain"'
KUBELET_FIREWALL_RULE = ('-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" '
                         '-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP')


def chain_rules(text: str, table: str, chain: str) -> list[str]:
    """The rules of one chain in order (kube-proxy's assertIPTablesChainEqual)."""
    current, found = "", []
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith(f"-A {chain} "):
            found.append(line)
    return found


def settings_config(settings: ProxySettings, *objects: dict[str, Any],
                    addresses: tuple[Any, ...] = NODE_INTERFACES) -> ProxyConfig:
    state = snapshot_of(*objects)
    config = proxy_config("test-node", settings, state, addresses)
    return dataclasses.replace(config, masquerade_mark="0x4000")


NODEPORT_SVC1 = (service("ns1", "svc1", "172.30.0.41", type_="NodePort", node_port=3001),
                 slice_("ns1", "svc1", ep("10.180.0.1"), ep("10.180.2.1", node="test-node")))


@pytest.mark.parametrize(("localhost", "addresses", "tail", "firewall"), [
    # TestNodePorts, the IPv4 cases
    (True, "", [f"{TAIL} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"], True),
    (False, "", [f"{TAIL} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"], False),
    (False, "192.168.0.0/24,127.0.0.1/32", [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS"], False),
    (False, "192.168.0.0/24,192.168.1.0/24,2001:db8::/64",
     [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS", f"{TAIL} -d 192.168.1.2 -j KUBE-NODEPORTS"], False),
    # the same with localhost NodePorts left on: 127.0.0.1/32 keeps them (and its own tail rule)
    (True, "192.168.0.0/24,127.0.0.1/32",
     [f"{TAIL} -d 127.0.0.1 -j KUBE-NODEPORTS", f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS"], True),
    (True, "192.168.0.0/24", [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS"], False),
    # only IPv6 CIDRs, or a zero CIDR: every address (NewNodePortAddresses' fallback)
    (True, "2001:db8::/64", [f"{TAIL} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"], True),
    (False, "192.168.0.0/24,0.0.0.0/0",
     [f"{TAIL} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"], False),
])
def test_node_ports_as_kube_proxys_test_node_ports(localhost: bool, addresses: str, tail: list[str],
                                                    firewall: bool) -> None:
    cidrs = tuple(ipaddress.ip_network(c) for c in addresses.split(",") if c)
    config = settings_config(ProxySettings(localhost_nodeports=localhost, nodeport_addresses=cidrs), *NODEPORT_SVC1)
    text = rules(snapshot_of(*NODEPORT_SVC1), config)
    assert [r for r in nat_rules(text) if r.startswith(TAIL)] == tail
    assert chain_rules(text, "filter", "KUBE-FIREWALL") == ([KUBELET_FIREWALL_RULE] if firewall else [])


def test_nodeport_addresses_resolve_against_the_nodes_addresses_offline() -> None:
    node = k8s.node("test-node", "192.168.0.2", "10.180.2.0/24")
    settings = ProxySettings(nodeport_addresses=(ipaddress.ip_network("192.168.0.0/16"),
                                                 ipaddress.ip_network("127.0.0.0/8")))
    config = settings_config(settings, node, *NODEPORT_SVC1, addresses=())
    assert config.nodeport_ips == (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("192.168.0.2"))
    assert config.localhost_nodeports_enabled


def test_primary_nodeport_addresses_are_the_node_ips_or_no_address_without_a_node() -> None:
    node = k8s.node("test-node", "192.168.0.2", "10.180.2.0/24")
    with_node = settings_config(ProxySettings(nodeport_primary=True), node, *NODEPORT_SVC1)
    text = rules(snapshot_of(node, *NODEPORT_SVC1), with_node)
    assert [r for r in nat_rules(text) if r.startswith(TAIL)] == [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS"]
    assert chain_rules(text, "filter", "KUBE-FIREWALL") == []
    # no Node and no bind address: no node IP is known yet, so `primary` is no address (not every address) until
    # the Node arrives (tests/unit/service/test_config.py follows it through the change tracker)
    without = settings_config(ProxySettings(nodeport_primary=True), *NODEPORT_SVC1)
    assert without.nodeport_ips == () and not without.localhost_nodeports_enabled
    assert [r for r in nat_rules(rules(snapshot_of(*NODEPORT_SVC1), without)) if r.startswith(TAIL)] == []
    # a bind address is the node IP of its family
    bound = settings_config(ProxySettings(nodeport_primary=True, bind_address=ipaddress.ip_address("192.168.1.2")),
                            *NODEPORT_SVC1)
    assert bound.nodeport_ips == (ipaddress.ip_address("192.168.1.2"),)


def test_node_ips_follow_kube_proxys_detect_node_ips() -> None:
    state = snapshot_of({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "test-node"},
                         "status": {"addresses": [{"type": "ExternalIP", "address": "203.0.113.9"},
                                                  {"type": "InternalIP", "address": "fd00::2"},
                                                  {"type": "InternalIP", "address": "192.168.0.2"}]}})
    assert node_ips(state.node, None) == {6: ipaddress.ip_address("fd00::2"), 4: ipaddress.ip_address("192.168.0.2")}
    assert node_ips(None, None) == {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}
    assert node_ips(None, ipaddress.ip_address("0.0.0.0"))[4] == ipaddress.ip_address("127.0.0.1")
    assert node_ips(state.node, ipaddress.ip_address("10.1.1.1"))[4] == ipaddress.ip_address("10.1.1.1")


FORWARD_ACCEPTS = [
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate '
    'RELATED,ESTABLISHED -j ACCEPT',
]


@pytest.mark.parametrize(("liberal", "counters", "drop"), [
    # TestDropInvalidRule
    (False, frozenset(), ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"]),
    (False, frozenset({CT_STATE_INVALID_DROPPED}),
     ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP"]),
    (True, frozenset(), []),
    (True, frozenset(NFACCT_COUNTERS), []),
])
def test_drop_invalid_rule(liberal: bool, counters: frozenset[str], drop: list[str]) -> None:
    config = settings_config(ProxySettings(conntrack_tcp_liberal=liberal, nfacct_counters=counters))
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), config)
    assert chain_rules(text, "filter", "KUBE-FORWARD") == [*drop, *FORWARD_ACCEPTS]


@pytest.mark.parametrize("counters", [frozenset(), frozenset({CT_STATE_INVALID_DROPPED}),
                                      frozenset({LOCALHOST_NODEPORTS_ACCEPTED}), frozenset(NFACCT_COUNTERS)])
def test_each_nfacct_counter_is_rendered_only_when_it_exists(counters: frozenset[str]) -> None:
    config = settings_config(ProxySettings(nfacct_counters=counters), *NODEPORT_SVC1)
    text = rules(snapshot_of(*NODEPORT_SVC1), config)
    localhost = [r for r in nat_rules(text) if "localhost_nps_accepted_pkts" in r]
    ext = names.external_chain("ns1/svc1:p80", "tcp")
    assert localhost == ([f"-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp -d 127.0.0.0/8 "
                          f"--dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j {ext}"]
                         if LOCALHOST_NODEPORTS_ACCEPTED in counters else [])
    assert ("ct_state_invalid_dropped_pkts" in text) == (CT_STATE_INVALID_DROPPED in counters)
    # localhost NodePorts off: no localhost rule, counter or not
    off = settings_config(ProxySettings(nfacct_counters=counters, localhost_nodeports=False), *NODEPORT_SVC1)
    assert "localhost_nps_accepted_pkts" not in rules(snapshot_of(*NODEPORT_SVC1), off)


@pytest.mark.parametrize("random_fully", [False, True])
def test_masquerade_rule(random_fully: bool) -> None:
    """TestMasqueradeRule."""
    config = settings_config(ProxySettings(random_fully=random_fully))
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), config)
    assert chain_rules(text, "nat", "KUBE-POSTROUTING") == [
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + (" --random-fully" if random_fully else "")]


def test_masquerade_bit_sets_kube_proxys_mark() -> None:
    config = proxy_config("test-node", ProxySettings(masquerade_bit=10), snapshot_of(), ())
    assert config.mark == "0x00000400"
    text = rules(snapshot_of(service("ns1", "svc1", "172.30.0.41")), config)
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00000400" in nat_rules(text)


def test_the_node_ip_without_a_node_is_the_bind_address_for_load_balancer_source_ranges() -> None:
    lb = service("ns5", "svc5", "172.30.0.45", type_="LoadBalancer", node_port=3002)
    lb["spec"]["loadBalancerSourceRanges"] = ["192.168.0.0/24"]
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}
    objects = (lb, slice_("ns5", "svc5", ep("10.180.0.3")))
    fw = names.firewall_chain("ns5/svc5:p80", "tcp")
    for bind, allowed in ((None, False), ("192.168.0.2", True), ("10.0.0.1", False)):
        settings = ProxySettings(bind_address=ipaddress.ip_address(bind) if bind else None)
        text = rules(snapshot_of(*objects), settings_config(settings, *objects))
        assert any(r.startswith(f"-A {fw} ") and "-s 5.6.7.8 " in r for r in nat_rules(text)) == allowed


def test_nfacct_matches_read_back_as_iptables_prints_them() -> None:
    """As iptables 1.8.9 prints them (libxt_nfacct writes the name after two spaces), so `chains --diff`
    and `--format list` compare equal with a node whose agent created the counters."""
    from nodeagent.service.iptables.formats import list_line, parse_rule, save_line

    rule = parse_rule("-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name "
                      "ct_state_invalid_dropped_pkts -j DROP")
    assert save_line(rule) == ("-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name  "
                               "ct_state_invalid_dropped_pkts -j DROP")
    assert list_line(rule) == ("DROP       0    --  0.0.0.0/0            0.0.0.0/0            ctstate INVALID "
                               "nfacct-name  ct_state_invalid_dropped_pkts")
