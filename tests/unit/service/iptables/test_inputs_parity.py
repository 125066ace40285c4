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
