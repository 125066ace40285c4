"""The IPv6 proxier's rules against kube-proxy's own IPv6 expectations, and dual-stack Services split by family.

kube-proxy runs one proxier per family (pkg/proxy/metaproxier); its IPv6 tests build the fake proxier on
`iptablestest.NewIPv6Fake()`: pod CIDR fd00:10::/64 (or a no-op local detector), mark 0x4000, the same chain
names (the hash of the port name and protocol, whatever the family). The expected texts are kube-proxy's
(pkg/proxy/iptables/proxier_test.go, the test named in each docstring), compared after its own test sort.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from nodeagent.service.config import ProxyConfig, ProxySettings, proxy_config
from nodeagent.service.iptables import names
from nodeagent.service.iptables.render import render
from nodeagent.state.tracker import Snapshot
from tests.support.iptables_dump import sort_rules
from tests.support.services import ep, service, slice_, snapshot_of

# NewFakeProxier(iptablestest.NewIPv6Fake()) with fp.localDetector = NewNoOpLocalDetector() (the localhost
# NodePort tests); its node IP stays testNodeIP, and that version of the fake had no nfacct counters
FAKE_IPV6_PROXIER = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                                masquerade_mark="0x4000", family=6)
GOLDEN = Path(__file__).parents[4] / "tests" / "golden"
LOCALHOST_NODEPORTS_IPV6 = (GOLDEN / "kube-proxy-ipv6-localhost-nodeports.rules").read_text()
TAIL = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in '
        'this chain"')
NODE_INTERFACES = tuple(ipaddress.ip_address(ip) for ip in (
    "127.0.0.1", "::1", "192.168.0.2", "192.168.1.2", "192.168.99.11", "2001:db8::1", "2001:db8:1::2"))


def slice6(namespace: str, service_name: str, *endpoints: dict[str, Any], name: str = "") -> dict[str, Any]:
    """An addressType IPv6 EndpointSlice (kube-proxy's makeTestEndpointSlice with AddressTypeIPv6)."""
    body = slice_(namespace, service_name, *endpoints)
    body["addressType"] = "IPv6"
    if name:
        body["metadata"]["name"] = name
    return body


def rules(snapshot: Snapshot, config: ProxyConfig) -> str:
    return render(snapshot.service_ports, snapshot.endpoints, config).text()


def assert_rules(actual: str, expected: str) -> None:
    assert sort_rules(actual).splitlines() == sort_rules(dedent(expected)).splitlines()


def nat_rules(text: str) -> list[str]:
    return [line for line in text.split("*nat", 1)[1].splitlines() if line.startswith("-A ")]


LOCAL_NODEPORT_V6 = (service("ns1", "svc1", "fd00:ab34::20", type_="NodePort", node_port=30001,
                             externalTrafficPolicy="Local"),
                     slice6("ns1", "svc1", ep("ff06::c1"), ep("ff06::c2", node="test-node")))


@pytest.mark.parametrize("localhost_nodeports", [True, False])
def test_ipv6_localhost_nodeports_as_kube_proxys_tests(localhost_nodeports: bool) -> None:
    """TestEnableLocalhostNodePortsIPv6 / TestDisableLocalhostNodePortsIPv6: the same rules either way (no
    localhost NodePorts on IPv6, so no KUBE-FIREWALL rule and `! -d ::1/128` on the NodePort jump), bracketed
    `[ip]:port` DNAT destinations, endpoints ordered by that string."""
    config = dataclasses.replace(FAKE_IPV6_PROXIER, localhost_nodeports=localhost_nodeports)
    assert_rules(rules(snapshot_of(*LOCAL_NODEPORT_V6), config), LOCALHOST_NODEPORTS_IPV6)


def test_the_ipv4_proxier_renders_nothing_of_an_ipv6_service_and_the_ipv6_one_nothing_of_an_ipv4_one() -> None:
    v4_config = dataclasses.replace(FAKE_IPV6_PROXIER, family=4)
    v4_text = rules(snapshot_of(*LOCAL_NODEPORT_V6), v4_config)
    assert "ns1/svc1" not in v4_text and "ff06::" not in v4_text
    v4_only = (service("ns1", "svc1", "172.30.0.41"), slice_("ns1", "svc1", ep("10.180.0.1")))
    assert "ns1/svc1" not in rules(snapshot_of(*v4_only), FAKE_IPV6_PROXIER)


NODEPORT_V6 = (service("ns1", "svc1", "fd00:172:30::41", type_="NodePort", node_port=3001),
               slice6("ns1", "svc1", ep("fd00:10:180::1"), ep("fd00:10:180::2:1", node="test-node")))


@pytest.mark.parametrize(("localhost", "addresses", "tail"), [
    # TestNodePorts, the IPv6 cases: NodePorts on every local address but ::1 (localhost NodePorts are IPv4
    # only, whatever --iptables-localhost-nodeports says), or only on the IPv6 addresses --nodeport-addresses
    # selects (2001:db8::1, not the alternate 2001:db8:1::2); never a KUBE-FIREWALL rule
    (True, "", [f"{TAIL} -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"]),
    (False, "", [f"{TAIL} -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"]),
    (False, "192.168.0.0/24,192.168.1.0/24,2001:db8::/64", [f"{TAIL} -d 2001:db8::1 -j KUBE-NODEPORTS"]),
    # an IPv4-only --nodeport-addresses leaves the IPv6 proxier on every address (NewNodePortAddresses)
    (False, "192.168.0.0/24", [f"{TAIL} -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"]),
])
def test_ipv6_node_ports_as_kube_proxys_test_node_ports(localhost: bool, addresses: str, tail: list[str]) -> None:
    cidrs = tuple(ipaddress.ip_network(c) for c in addresses.split(",") if c)
    settings = ProxySettings(localhost_nodeports=localhost, nodeport_addresses=cidrs,
                             cluster_cidrs=(ipaddress.ip_network("fd00:10::/64"),))
    state = snapshot_of(*NODEPORT_V6)
    config = dataclasses.replace(proxy_config("test-node", settings, state, NODE_INTERFACES, family=6),
                                 masquerade_mark="0x4000")
    assert not config.localhost_nodeports_enabled
    text = rules(state, config)
    assert [r for r in nat_rules(text) if r.startswith(TAIL)] == tail
    assert "KUBE-FIREWALL" not in text and "127.0.0.0/8" not in text
    # the pod CIDR of the family is the local-traffic detector: traffic from outside it is masqueraded
    assert ('-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
            "-d fd00:172:30::41 --dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ") in nat_rules(text)


def test_an_ipv6_service_without_endpoints_is_rejected_as_kube_proxy_writes_it() -> None:
    """kube-proxy writes `-j REJECT` for both families; ip6tables' REJECT answers ICMPv6 port unreachable
    (`--reject-with icmp6-port-unreachable`, as ip6tables-save prints it: nodeagent.service.iptables.formats)."""
    text = rules(snapshot_of(service("ns6", "svc6", "fd00:172:30::46")), FAKE_IPV6_PROXIER)
    assert ('-A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp '
            "-d fd00:172:30::46 --dport 80 -j REJECT") in text.splitlines()


DUAL_STACK = (
    service("ns2", "svc2", "172.30.0.42", type_="LoadBalancer", node_port=3001, ipFamilyPolicy="RequireDualStack",
            clusterIPs=["172.30.0.42", "fd00:172:30::42"], ipFamilies=["IPv4", "IPv6"],
            externalIPs=["192.168.99.22", "2001:db8:99::22"],
            loadBalancerSourceRanges=["203.0.113.0/25", "2001:db8:203::/64"],
            status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "2001:db8:1:2::4"}]}}),
    slice_("ns2", "svc2", ep("10.180.0.2")),
    slice6("ns2", "svc2", ep("fd00:10:180::2"), name="svc2-v6"),
)
SINGLE_STACK_V4 = (
    service("ns2", "svc2", "172.30.0.42", type_="LoadBalancer", node_port=3001, externalIPs=["192.168.99.22"],
            loadBalancerSourceRanges=["203.0.113.0/25"], status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
    slice_("ns2", "svc2", ep("10.180.0.2")),
)


def test_a_dual_stack_service_is_one_service_port_per_family_with_the_same_chain_names() -> None:
    """kube-proxy's ServiceChangeTracker per family: each proxier takes its family's clusterIP, externalIPs, LB
    VIPs and source ranges (newBaseServiceInfo); the IPv4 rules are those of the same Service single-stack,
    byte for byte, and the IPv6 rules use the same chain names with the IPv6 addresses."""
    v4 = dataclasses.replace(FAKE_IPV6_PROXIER, family=4, cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    v6 = dataclasses.replace(FAKE_IPV6_PROXIER, cluster_cidrs=(ipaddress.ip_network("fd00:10::/64"),))
    dual = snapshot_of(*DUAL_STACK)
    assert rules(dual, v4) == rules(snapshot_of(*SINGLE_STACK_V4), v4)
    text6 = rules(dual, v6)
    assert not any(f" {a}" in text6 for a in ("172.30.0.42", "192.168.99.22", "1.2.3.4", "203.0.113.0/25",
                                              "10.180.0.2"))
    fw = names.firewall_chain("ns2/svc2:p80", "tcp")
    ext = names.external_chain("ns2/svc2:p80", "tcp")
    sep = names.endpoint_chain("ns2/svc2:p80", "tcp", "[fd00:10:180::2]:80")
    for expected in (
        f'-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d fd00:172:30::42 --dport 80 '
        f"-j {names.cluster_chain('ns2/svc2:p80', 'tcp')}",
        f'-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 2001:db8:99::22 '
        f"--dport 80 -j {ext}",
        f'-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 2001:db8:1:2::4 '
        f"--dport 80 -j {fw}",
        f'-A {fw} -m comment --comment "ns2/svc2:p80 loadbalancer IP" -s 2001:db8:203::/64 -j {ext}',
        f"-A {sep} -m comment --comment ns2/svc2:p80 -s fd00:10:180::2 -j KUBE-MARK-MASQ",
        f"-A {sep} -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination [fd00:10:180::2]:80",
    ):
        assert expected in text6.splitlines()
    assert ('-A KUBE-PROXY-FIREWALL -m comment --comment "ns2/svc2:p80 traffic not accepted by '
            f'{fw}" -m tcp -p tcp -d 2001:db8:1:2::4 --dport 80 -j DROP') in text6.splitlines()


def test_an_ipv6_primary_dual_stack_service_renders_its_ipv4_secondary_in_the_ipv4_proxier() -> None:
    svc = service("ns1", "svc1", "fd00:172:30::41", clusterIPs=["fd00:172:30::41", "172.30.0.41"],
                  ipFamilies=["IPv6", "IPv4"], ipFamilyPolicy="PreferDualStack")
    state = snapshot_of(svc, slice_("ns1", "svc1", ep("10.180.0.1")), slice6("ns1", "svc1", ep("fd00:10:180::1"),
                                                                             name="svc1-v6"))
    v4 = rules(state, dataclasses.replace(FAKE_IPV6_PROXIER, family=4))
    v6 = rules(state, FAKE_IPV6_PROXIER)
    assert "-d 172.30.0.41 --dport 80" in v4 and "10.180.0.1:80" in v4 and "fd00" not in v4
    assert "-d fd00:172:30::41 --dport 80" in v6 and "[fd00:10:180::1]:80" in v6 and "172.30.0.41" not in v6
