# ruff: noqa: E501
"""The nftables renderer against kube-proxy's own expectations.

The expected tables are kube-proxy's (pkg/proxy/nftables/proxier_test.go: baseRules, TestOverallNFTablesRules
and the others named below), for the same Services and EndpointSlices, under the settings of its fake proxier
(NewFakeProxier): node `test-node` at 192.168.0.2, pod CIDR 10.0.0.0/8, Service CIDR 172.30.0.0/16, mark
0x4000, --nodeport-addresses 192.168.0.2/32 and 2001:db8::1/128. They were not produced by this code; they are
compared after kube-proxy's own sort (helpers_test.go sortNFTablesTransaction).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from textwrap import dedent
from typing import Any

from nodeagent.service.config import ProxyConfig
from nodeagent.service.nftables import names
from nodeagent.service.nftables.render import RenderCache, render
from nodeagent.service.nftables.ruleset import sort_transaction
from nodeagent.state.tracker import Snapshot
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

GOLDEN = Path(__file__).parents[4] / "tests" / "golden"
BASE_RULES = (GOLDEN / "nft-base.rules").read_text()
OVERALL = (GOLDEN / "nft-overall.rules").read_text()

FAKE_PROXIER = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                           cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), masquerade_mark="0x4000",
                           nodeport_ips=(ipaddress.ip_address("192.168.0.2"), ipaddress.ip_address("2001:db8::1")),
                           service_cidrs=(ipaddress.ip_network("172.30.0.0/16"),))


def dump(snapshot: Snapshot, config: ProxyConfig = FAKE_PROXIER, **kwargs: Any) -> str:
    return render(snapshot.service_ports, snapshot.endpoints, config, **kwargs).dump()


def assert_table(actual: str, expected: str) -> None:
    assert sort_transaction(actual) == sort_transaction(dedent(expected))


def test_base_rules_equal_kube_proxys() -> None:
    assert_table(dump(snapshot_of()), BASE_RULES)


def test_overall_rules_equal_kube_proxys() -> None:
    """TestOverallNFTablesRules."""
    assert_table(dump(snapshot_of(*OVERALL_OBJECTS)), BASE_RULES + OVERALL)


def test_dump_is_already_in_kube_proxys_order() -> None:
    text = dump(snapshot_of(*OVERALL_OBJECTS))
    assert text.splitlines() == sort_transaction(text)


def test_chain_names_are_kube_proxys_hashes() -> None:
    """Test_servicePortChainNameBase and Test_servicePortEndpointChainNameBase."""
    assert names.port_base("testing", "service", "tcp", "http") == "P4ZYZVCF-testing/service/tcp/http"
    assert names.port_base("testing", "service", "tcp", "https") == "LZBRENCP-testing/service/tcp/https"
    assert names.endpoint_base("testing", "service", "tcp", "http", "10.180.0.1:80") == \
        "JO2XBXZR-testing/service/tcp/http__10.180.0.1/80"
    assert names.endpoint_base("testing", "service", "tcp", "http", "10.180.0.2:80") == \
        "5S6H3H22-testing/service/tcp/http__10.180.0.2/80"
    assert names.endpoint_base("testing", "service", "tcp", "http", "[fd80:abcd:12::a1b2:c3d4:e5f6:9999]:80") == \
        "U7E2ET36-testing/service/tcp/http__fd80.abcd.12..a1b2.c3d4.e5f6.9999/80"
    ns = "very-long-namespace-name-abcdefghijklmnopqrstuvwxyz0123456789xx"
    svc = "very-long-service-name-why-would-you-even-do-this-i-mean-really"
    port = "port-443-providing-the-hypertext-transmission-protocol-with-tls"
    assert names.port_base(ns, svc, "sctp", port) == f"KR6NACJP-{ns}/{svc}/sctp/{port}"
    assert names.endpoint_base(ns, svc, "sctp", port, "[1234:5678:9abc:def0::abc:1234]:443") == \
        f"5YS7AFEA-{ns}/{svc}/sctp/{port}__1234.5678.9abc.def0..abc.1234/443"
    assert names.endpoint_base(ns, svc, "sctp", port, "[1234:5678:9abc:def0::abcd:1234:5678]:443") == \
        f"CI6C53Q3-{ns}/{svc}/sctp/{port}__1234.5678.9abc.def0..abcd.1234..."
    assert names.endpoint_base(ns, svc, "sctp", port, "[1234:5678:9abc:def0::abcd:1234:8765]:443") == \
        f"2FLXFK6X-{ns}/{svc}/sctp/{port}__1234.5678.9abc.def0..abcd.1234..."


def _service_chain_rules(text: str, chain_prefix: str) -> list[str]:
    return [line.split(" ", 5)[5] for line in text.splitlines()
            if line.startswith("add rule ") and line.split(" ")[4].startswith(chain_prefix)]


def test_no_endpoints_reject_every_address() -> None:
    """TestNoEndpointsReject: cluster IP, external IP, NodePort and load-balancer IP all reject."""
    text = dump(snapshot_of(service("ns1", "svc1", "172.30.0.41", type_="LoadBalancer", node_port=3001,
                                    externalIPs=["192.168.99.11"],
                                    status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})))
    extra = set(text.splitlines()) - set(BASE_RULES.splitlines())
    reject = 'comment "ns1/svc1:p80" : goto reject-chain }'
    assert extra == {
        "add element ip kube-proxy cluster-ips { 172.30.0.41 }",
        f"add element ip kube-proxy no-endpoint-services {{ 172.30.0.41 . tcp . 80 {reject}",
        f"add element ip kube-proxy no-endpoint-services {{ 192.168.99.11 . tcp . 80 {reject}",
        f"add element ip kube-proxy no-endpoint-services {{ 1.2.3.4 . tcp . 80 {reject}",
        f"add element ip kube-proxy no-endpoint-nodeports {{ tcp . 3001 {reject}",
    }


def test_external_traffic_policy_local() -> None:
    """TestExternalTrafficPolicyLocal: the local endpoint only from outside, every endpoint from pods and the
    node (short-circuited to the cluster chain), no masquerade of external traffic."""
    text = dump(snapshot_of(
        service("ns1", "svc1", "172.30.0.41", type_="LoadBalancer", node_port=3001, externalTrafficPolicy="Local",
                externalIPs=["192.168.99.11"], healthCheckNodePort=30000,
                status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
        slice_("ns1", "svc1", ep("10.180.0.1"), ep("10.180.2.1", node="test-node"))))
    base = names.port_base("ns1", "svc1", "tcp", "p80")
    ep1 = "endpoint-" + names.endpoint_base("ns1", "svc1", "tcp", "p80", "10.180.0.1:80")
    ep2 = "endpoint-" + names.endpoint_base("ns1", "svc1", "tcp", "p80", "10.180.2.1:80")
    assert _service_chain_rules(text, f"external-{base}") == [
        f'ip saddr 10.0.0.0/8 goto service-{base} comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        f'fib saddr type local goto service-{base} comment "short-circuit local traffic"',
        f"goto local-{base}",
    ]
    assert _service_chain_rules(text, f"local-{base}") == [f"numgen random mod 1 vmap {{ 0 : goto {ep2} }}"]
    assert _service_chain_rules(text, f"service-{base}") == [
        "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"numgen random mod 2 vmap {{ 0 : goto {ep1} , 1 : goto {ep2} }}"]
    assert f"add element ip kube-proxy service-nodeports {{ tcp . 3001 : goto external-{base} }}" in text
    assert "no-endpoint" not in text.replace("@no-endpoint", "").replace("map ip kube-proxy no-endpoint", "")


def test_load_balancer_source_ranges_allow_the_node_and_lb_ips() -> None:
    """TestLoadBalancer: a source range holding the node IP lets the LB IPs in too (VIP-like load balancers)."""
    text = dump(snapshot_of(
        service("ns1", "svc1", "172.30.0.41", type_="LoadBalancer", node_port=3001,
                loadBalancerSourceRanges=["192.168.0.0/24", " 203.0.113.0/25"],
                status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "5.6.7.8"}]}}),
        slice_("ns1", "svc1", ep("10.180.0.1"))))
    base = names.port_base("ns1", "svc1", "tcp", "p80")
    assert _service_chain_rules(text, f"firewall-{base}") == [
        "ip saddr != { 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 } drop"]
    assert f"add element ip kube-proxy firewall-ips {{ 1.2.3.4 . tcp . 80 : goto firewall-{base} }}" in text
    assert f"add element ip kube-proxy firewall-ips {{ 5.6.7.8 . tcp . 80 : goto firewall-{base} }}" in text
    # NodePorts bypass the source ranges: the NodePort goes to the external chain
    assert f"add element ip kube-proxy service-nodeports {{ tcp . 3001 : goto external-{base} }}" in text


def test_internal_traffic_policy_local_without_local_endpoints_drops() -> None:
    """TestInternalTrafficPolicy (no local endpoints): the cluster IP drops instead of rejecting."""
    text = dump(snapshot_of(
        service("ns1", "svc1", "172.30.1.1", port_name="", internalTrafficPolicy="Local"),
        slice_("ns1", "svc1", ep("10.0.1.1", node="node0"), ep("10.0.1.2", node="node1"), port_name="")))
    assert 'add element ip kube-proxy no-endpoint-services { 172.30.1.1 . tcp . 80 comment "ns1/svc1" : drop }' in text
    assert not [line for line in text.splitlines() if line.startswith("add chain") and "/" in line.split(" ")[4]]


def test_nodeport_addresses_match_all_uses_fib() -> None:
    """TestNodePorts (no --nodeport-addresses): no nodeport-ips set, NodePorts on every local address but
    loopback."""
    config = ProxyConfig(node_name="test-node", cluster_cidrs=FAKE_PROXIER.cluster_cidrs, masquerade_mark="0x4000")
    lines = dump(snapshot_of(), config).splitlines()
    assert "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport " \
           "vmap @service-nodeports" in lines
    assert "add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport " \
           "vmap @no-endpoint-nodeports" in lines
    assert not any("nodeport-ips" in line for line in lines)
    # and without a Service CIDR, no drop of unallocated cluster IPs
    assert not any("Drop traffic to unallocated ClusterIPs" in line for line in lines)


def test_nodeport_addresses_several() -> None:
    """TestNodePorts ("ipv4, multiple nodeport-addresses"): every matching address in nodeport-ips, loopback
    never."""
    config = ProxyConfig(node_name="test-node", masquerade_mark="0x4000",
                         nodeport_ips=tuple(ipaddress.ip_address(a) for a in ("127.0.0.1", "192.168.0.2",
                                                                              "192.168.1.2")))
    lines = dump(snapshot_of(), config).splitlines()
    assert [line for line in lines if line.startswith("add element")] == [
        "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
        "add element ip kube-proxy nodeport-ips { 192.168.1.2 }"]


def test_ipv6_table() -> None:
    """TestNodePorts ("ipv6"): the ip6 table, ipv6_addr keys, `ip6` matches, `[ip]:port` endpoints."""
    config = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("2001:db8::1"), family=6,
                         cluster_cidrs=(ipaddress.ip_network("fd00:10::/64"),), masquerade_mark="0x4000",
                         service_cidrs=(ipaddress.ip_network("fd00:10:96::/112"),))
    raw = service("ns1", "svc1", "fd00:172:30::41", type_="NodePort", node_port=3001)
    raw["spec"]["ipFamilies"] = ["IPv6"]
    eps = slice_("ns1", "svc1", ep("fd00:10:180::1"), ep("fd00:10:180::2:1", node="test-node"))
    eps["addressType"] = "IPv6"
    text = dump(snapshot_of(raw, eps), config)
    base = names.port_base("ns1", "svc1", "tcp", "p80")
    ep1 = "endpoint-" + names.endpoint_base("ns1", "svc1", "tcp", "p80", "[fd00:10:180::1]:80")
    assert ep1 == "endpoint-" + names.hash_and_truncate("ns1/svc1/tcp/p80__fd00.10.180..1/80")
    lines = text.splitlines()
    assert lines[0] == 'add table ip6 kube-proxy { comment "rules for kube-proxy" ; }'
    assert 'add set ip6 kube-proxy cluster-ips { type ipv6_addr ; comment "Active ClusterIPs" ; }' in lines
    assert 'add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:10:96::/112 } drop comment ' \
           '"Drop traffic to unallocated ClusterIPs"' in lines
    assert "add rule ip6 kube-proxy services fib daddr type local ip6 daddr != ::1 meta l4proto . th dport " \
           "vmap @service-nodeports" in lines
    assert f"add rule ip6 kube-proxy service-{base} ip6 daddr fd00:172:30::41 ip6 saddr != fd00:10::/64 " \
           "jump mark-for-masquerade" in lines
    assert f"add rule ip6 kube-proxy {ep1} ip6 saddr fd00:10:180::1 jump mark-for-masquerade" in lines
    assert f"add rule ip6 kube-proxy {ep1} meta l4proto tcp dnat to [fd00:10:180::1]:80" in lines
    assert f"add element ip6 kube-proxy service-ips {{ fd00:172:30::41 . tcp . 80 : goto service-{base} }}" in lines


def test_session_affinity_sets_per_endpoint() -> None:
    text = dump(snapshot_of(*OVERALL_OBJECTS))
    assert [line for line in text.splitlines() if line.startswith("add set ip kube-proxy affinity-")] == [
        "add set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 "
        "{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }"]


def test_masquerade_all() -> None:
    config = ProxyConfig(**{**FAKE_PROXIER.__dict__, "masquerade_all": True})
    text = dump(snapshot_of(*OVERALL_OBJECTS[:1], OVERALL_OBJECTS[6]), config)
    assert "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 jump mark-for-masquerade" \
        in text.splitlines()


def test_cache_reuses_unchanged_ports_and_renders_the_same() -> None:
    snapshot = snapshot_of(*OVERALL_OBJECTS)
    cache: RenderCache = {}
    first = render(snapshot.service_ports, snapshot.endpoints, FAKE_PROXIER, cache=cache).dump()
    again = render(snapshot.service_ports, snapshot.endpoints, FAKE_PROXIER, cache=cache).dump()
    assert first == again == dump(snapshot)


def test_load_balancer_ip_mode_proxy_gets_no_element() -> None:
    """TestLoadBalancerIngressRouteTypeProxy: an ingress IP with ipMode Proxy is not captured (VIP and unset are)."""
    for mode, expected in (("Proxy", False), ("VIP", True), (None, True)):
        ingress: dict[str, Any] = {"ip": "1.2.3.4"} if mode is None else {"ip": "1.2.3.4", "ipMode": mode}
        text = dump(snapshot_of(
            service("ns1", "svc1", "10.20.30.41", type_="LoadBalancer", node_port=3001,
                    status={"loadBalancer": {"ingress": [ingress]}}),
            slice_("ns1", "svc1", ep("10.180.0.1"))))
        assert ("add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto " in text) is expected, mode


def test_bad_ips_are_written_canonically() -> None:
    """TestBadIPs: legacy addresses with leading zeros (and a padded source range) come out canonical."""
    text = dump(snapshot_of(
        service("ns1", "svc1", "172.30.0.041", type_="LoadBalancer", node_port=3001,
                externalIPs=["192.168.099.022"], loadBalancerSourceRanges=["203.0.113.000/025"],
                status={"loadBalancer": {"ingress": [{"ip": "1.2.3.004"}]}}),
        slice_("ns1", "svc1", ep("10.180.00.001"))))
    assert_table(text, BASE_RULES + """
        add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
        add chain ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 jump mark-for-masquerade
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto service-ULMVA6XW-ns1/svc1/tcp/p80
        add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
        add chain ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80 ip saddr != { 203.0.113.0/25 } drop
        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 192.168.99.22 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy firewall-ips { 1.2.3.4 . tcp . 80 : goto firewall-ULMVA6XW-ns1/svc1/tcp/p80 }
    """)
