"""Service and EndpointSlice inputs read as kube-proxy reads them, against kube-proxy's expected rules.

The expected texts are kube-proxy's (pkg/proxy/iptables/proxier_test.go, the test named in each case's
docstring), under the flags of its fake proxier: node `test-node` at 192.168.0.2, cluster CIDR 10.0.0.0/8,
mark 0x4000, nfacct on. They were not produced by this code; they are compared after kube-proxy's own
test sort. Objects go through the decoder and the change tracker (tests.support.services), as in `run`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from nodeagent.cluster.decode import decode
from nodeagent.service.config import NFACCT_COUNTERS, ProxyConfig
from nodeagent.service.iptables.render import render
from nodeagent.state.tracker import Snapshot
from tests.support.iptables_dump import sort_rules
from tests.support.services import ep, service, slice_, snapshot_of

FAKE_PROXIER = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                           cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), masquerade_mark="0x4000",
                           nfacct_counters=frozenset(NFACCT_COUNTERS))


def rules(snapshot: Snapshot) -> str:
    return render(snapshot.service_ports, snapshot.endpoints, FAKE_PROXIER).text()


def assert_rules(actual: str, expected: str) -> None:
    assert sort_rules(actual).splitlines() == sort_rules(dedent(expected)).splitlines()


# --- sloppy IPv4: leading zeros, as ParseIPSloppy / ParseCIDRSloppy read them ------------------------

BAD_IPS_SERVICE = service("ns1", "svc1", "172.30.0.041", type_="LoadBalancer", node_port=3001,
                          externalIPs=["192.168.099.022"], loadBalancerSourceRanges=["203.0.113.000/025"],
                          status={"loadBalancer": {"ingress": [{"ip": "1.2.3.004"}]}})
BAD_IPS_SLICE = slice_("ns1", "svc1", ep("10.180.00.001"))

# TestBadIPs' expected iptables-restore input, verbatim
BAD_IPS_EXPECTED = (Path(__file__).parents[4] / "tests" / "golden" / "kube-proxy-bad-ips.rules").read_text()


def test_bad_ips_are_programmed_in_their_canonical_form() -> None:
    """TestBadIPs: clusterIP, externalIP, LB ingress IP, source range and endpoint address with leading zeros
    are rewritten to the canonical form in the input to iptables-restore."""
    assert_rules(rules(snapshot_of(BAD_IPS_SERVICE, BAD_IPS_SLICE)), BAD_IPS_EXPECTED)


def test_each_bad_ip_is_reported_with_its_object_field_and_value_as_written() -> None:
    service_fields = [(c.field, c.written, c.canonical) for c in decode(BAD_IPS_SERVICE).canonicalized]
    assert service_fields == [
        ("spec.clusterIPs[0]", "172.30.0.041", "172.30.0.41"),
        ("status.loadBalancer.ingress[0].ip", "1.2.3.004", "1.2.3.4"),
        ("spec.loadBalancerSourceRanges[0]", "203.0.113.000/025", "203.0.113.0/25"),
        ("spec.externalIPs[0]", "192.168.099.022", "192.168.99.22"),
    ]
    (endpoint,) = decode(BAD_IPS_SLICE).canonicalized
    assert str(endpoint) == "EndpointSlice ns1/svc1-1: endpoints[0].addresses[0]: '10.180.00.001' read as 10.180.0.1"


def test_a_source_range_with_host_bits_or_space_is_the_network_kube_proxy_programs() -> None:
    """TestOverallIPTablesRules svc5 and TestLoadBalancer: " 203.0.113.0/25" (space, trimmed) and a range
    with host bits (ParseCIDRSloppy's network) give the same firewall rule."""
    expected = ('-A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" '
                "-s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O")
    for written in (" 203.0.113.0/25", "203.0.113.77/25", "203.0.113.0/25"):
        svc = service("ns1", "svc1", "172.30.0.41", type_="LoadBalancer", node_port=3001,
                      loadBalancerSourceRanges=[written], status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}})
        assert expected in rules(snapshot_of(svc, slice_("ns1", "svc1", ep("10.180.0.1")))).splitlines()
        assert [c.written for c in decode(svc).canonicalized] == ([] if written == "203.0.113.0/25" else [written])


# --- status.loadBalancer.ingress[].ipMode ------------------------------------------------------------

def ingress_service(lb_ip: str, cluster_ip: str, ip_mode: str | None, **spec: Any) -> dict[str, Any]:
    ingress = {"ip": lb_ip} if ip_mode is None else {"ip": lb_ip, "ipMode": ip_mode}
    return service("ns1", "svc1", cluster_ip, type_="LoadBalancer", node_port=3001,
                   status={"loadBalancer": {"ingress": [ingress]}}, **spec)


@pytest.mark.parametrize(("cluster_ip", "lb_ip", "ip_mode", "expected_rule"), [
    # TestLoadBalancerIngressRouteTypeProxy, the rows with LoadBalancerIPMode enabled (GA since 1.32)
    ("10.20.30.41", "1.2.3.4", "Proxy", False),
    ("10.20.30.42", "1.2.3.5", "VIP", True),
    ("10.20.30.43", "1.2.3.6", None, True),
])
def test_a_proxy_mode_ingress_ip_gets_no_rule(cluster_ip: str, lb_ip: str, ip_mode: str | None,
                                              expected_rule: bool) -> None:
    """TestLoadBalancerIngressRouteTypeProxy: no nat KUBE-SERVICES rule with the LB IP as destination."""
    snapshot = snapshot_of(ingress_service(lb_ip, cluster_ip, ip_mode), slice_("ns1", "svc1", ep("10.180.0.1")))
    services = [line for line in rules(snapshot).split("*nat", 1)[1].splitlines()
                if line.startswith("-A KUBE-SERVICES ")]
    assert any(f" -d {lb_ip} " in line for line in services) is expected_rule
    if expected_rule:
        assert (f'-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp -p tcp -d {lb_ip} '
                "--dport 80 -j KUBE-EXT-XPGD46QRK7WJZT7O") in services
    # what every datapath reads (iptables, eBPF maps, the tunnel's frontends): kube-proxy's LoadBalancerVIPs
    (info,) = snapshot.service_ports.values()
    assert [str(ip) for ip in info.load_balancer_ips] == ([lb_ip] if expected_rule else [])


def test_only_proxy_mode_ingress_ips_means_no_firewall_chain() -> None:
    """No LoadBalancerVIPs: kube-proxy's usesFWChain is false even with source ranges, and nothing of the IP
    reaches KUBE-PROXY-FIREWALL or KUBE-EXTERNAL-SERVICES; cluster IP and NodePort stay."""
    text = rules(snapshot_of(ingress_service("1.2.3.4", "172.30.0.41", "Proxy",
                                             loadBalancerSourceRanges=["203.0.113.0/25"]),
                             slice_("ns1", "svc1", ep("10.180.0.1"))))
    assert "1.2.3.4" not in text and "KUBE-FW-" not in text
    assert "-d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O" in text and "--dport 3001" in text


# --- EndpointSlice hints.forNodes (trafficDistribution: PreferSameNode) -------------------------------

def test_node_hints_keep_cluster_traffic_on_this_node() -> None:
    """Every ready endpoint has a node hint and one names this node: the cluster chain lists only it, and the
    other endpoint's chain is not written (kube-proxy's allReachableEndpoints)."""
    svc = service("ns1", "svc1", "172.30.0.41")
    hinted = slice_("ns1", "svc1", {**ep("10.180.0.1"), "hints": {"forNodes": [{"name": "test-node"}]}},
                    {**ep("10.180.0.2"), "hints": {"forNodes": [{"name": "node-2"}]}})
    text = rules(snapshot_of(svc, hinted))
    assert ('-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
            "-j KUBE-SEP-SXIVWICOYRO3J4NJ") in text.splitlines()
    assert "10.180.0.2" not in text
    unhinted = slice_("ns1", "svc1", {**ep("10.180.0.1"), "hints": {"forNodes": [{"name": "test-node"}]}},
                      ep("10.180.0.2"))
    assert "10.180.0.2:80" in rules(snapshot_of(svc, unhinted))
