"""`compare-modes`' decision: per Service port, the external path in eBPF mode and what a switch changes. Pure."""

from __future__ import annotations

from ipaddress import ip_address

from nodeagent.service.compare import ExternalPath, PortComparison, compare_modes, format_comparison
from nodeagent.service.ebpf.desired import TcGap
from tests.support.services import OVERALL_OBJECTS, snapshot_of


def compared() -> dict[str, PortComparison]:
    snapshot = snapshot_of(*OVERALL_OBJECTS)
    return {str(p.port): p for p in compare_modes(snapshot.service_ports, snapshot.endpoints,
                                                  node_ips=[ip_address("192.168.0.2")])}


def test_each_port_names_its_external_path_and_why() -> None:
    ports = compared()
    paths = {name: (p.external_path, p.gaps) for name, p in ports.items()}
    assert paths == {
        "ns1/svc1:p80": (ExternalPath.NONE, ()),
        "ns2/svc2:p80": (ExternalPath.IPTABLES, (TcGap.EXTERNAL_POLICY_LOCAL,)),
        "ns3/svc3:p80": (ExternalPath.TC, ()),
        "ns4/svc4:p80": (ExternalPath.TC, ()),
        "ns5/svc5:p80": (ExternalPath.IPTABLES, (TcGap.SOURCE_RANGES, TcGap.SESSION_AFFINITY)),
        "ns6/svc6:p80": (ExternalPath.NONE, ()),
    }
    assert ports["ns2/svc2:p80"].external_frontends == (
        "1.2.3.4:80/TCP", "192.168.0.2:3001/TCP", "192.168.99.22:80/TCP")


def test_differences_name_source_addresses_and_affinity() -> None:
    ports = compared()
    assert ports["ns1/svc1:p80"].differences == ()
    assert ports["ns2/svc2:p80"].differences == (), "eTP Local: kube-proxy's rules in both modes"
    tc_served = ports["ns4/svc4:p80"].differences
    assert any("local endpoint sees the client's address with eBPF" in d for d in tc_served)
    assert any("remote endpoint sees the external/load-balancer IP" in d for d in tc_served)
    assert any("ClientIP affinity" in d for d in ports["ns5/svc5:p80"].differences)


def test_the_text_ends_with_a_summary() -> None:
    snapshot = snapshot_of(*OVERALL_OBJECTS)
    text = format_comparison(compare_modes(snapshot.service_ports, snapshot.endpoints, node_ips=[]))
    assert "ns5/svc5:p80: from outside: kube-proxy's iptables rules in both modes (tc lacks: " \
           "loadBalancerSourceRanges, sessionAffinity=ClientIP)" in text
    assert text.endswith("6 Service ports: 3 behave the same in both modes, 3 differ as listed; 2 keep iptables "
                         "for external traffic in eBPF mode\n")
