"""The split of external traffic between tc and kube-proxy's iptables rules (desired.plan, tc_gaps). Pure."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from nodeagent.service.ebpf.desired import Frontend, Plan, TcGap, plan
from tests.support.services import OVERALL_OBJECTS, ep, service, slice_, snapshot_of

NODE = "test-node"


def planned(*objects: dict[str, Any], masquerade_all: bool = False) -> Plan:
    snapshot = snapshot_of(*objects, node=NODE)
    return plan(snapshot.service_ports, snapshot.endpoints, node_ips=[ip_address("192.168.0.2")],
                masquerade_all=masquerade_all)


def gaps_of(result: Plan) -> dict[str, tuple[TcGap, ...]]:
    return {str(name): gaps for name, gaps in result.external_stack.items()}


def test_kube_proxys_overall_objects_split_by_what_tc_lacks() -> None:
    result = planned(*OVERALL_OBJECTS)
    assert gaps_of(result) == {
        "ns2/svc2:p80": (TcGap.EXTERNAL_POLICY_LOCAL,),
        "ns5/svc5:p80": (TcGap.SOURCE_RANGES, TcGap.SESSION_AFFINITY),
    }
    flagged = {f for f, e in result.entries.items() if e.external_stack}
    assert flagged == {Frontend("192.168.99.22", 80, 6), Frontend("1.2.3.4", 80, 6), Frontend("192.168.0.2", 3001, 6),
                       Frontend("5.6.7.8", 80, 6), Frontend("192.168.0.2", 3002, 6)}, "every external frontend"
    assert not result.entries[Frontend("172.30.0.42", 80, 6)].external_stack, "cluster IPs stay on the socket LB"
    assert not result.entries[Frontend("192.168.0.2", 3003, 6)].external_stack, "a plain NodePort stays on tc"


@pytest.mark.parametrize(("spec", "endpoints", "expected"), [
    ({"type_": "NodePort", "node_port": 30001}, [ep("10.0.0.1")], ()),
    ({"type_": "NodePort", "node_port": 30001, "externalTrafficPolicy": "Local"}, [ep("10.0.0.1", NODE)],
     (TcGap.EXTERNAL_POLICY_LOCAL,)),
    ({"type_": "NodePort", "node_port": 30001, "externalTrafficPolicy": "Local"}, [],
     (TcGap.EXTERNAL_POLICY_LOCAL,)),  # kube-proxy DROPs (no local endpoints), not REJECT
    ({"type_": "NodePort", "node_port": 30001}, [], (TcGap.NO_ENDPOINTS,)),
    ({"type_": "NodePort", "node_port": 30001}, [ep("10.0.0.1", ready=False)], (TcGap.NO_ENDPOINTS,)),
    ({"type_": "NodePort", "node_port": 30001, "protocol": "SCTP"}, [ep("10.0.0.1")], (TcGap.SCTP,)),
    ({"type_": "NodePort", "node_port": 30001, "sessionAffinity": "ClientIP"}, [ep("10.0.0.1")],
     (TcGap.SESSION_AFFINITY,)),
    # ranges without a load-balancer IP filter nothing (the NodePort bypasses them in kube-proxy too)
    ({"type_": "LoadBalancer", "node_port": 30001, "loadBalancerSourceRanges": ["10.1.0.0/16"]}, [ep("10.0.0.1")], ()),
    ({"type_": "LoadBalancer", "node_port": 30001, "loadBalancerSourceRanges": ["10.1.0.0/16"],
      "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}, [ep("10.0.0.1")], (TcGap.SOURCE_RANGES,)),
    ({"externalIPs": ["192.168.99.9"]}, [], (TcGap.NO_ENDPOINTS,)),
    ({}, [], ()),  # a ClusterIP Service has no external frontend: nothing for tc to lack
    ({"sessionAffinity": "ClientIP", "internalTrafficPolicy": "Local"}, [], ()),
])
def test_tc_gaps(spec: dict[str, Any], endpoints: list[dict[str, Any]], expected: tuple[TcGap, ...]) -> None:
    protocol = spec.pop("protocol", "TCP")
    objects = (service("ns", "svc", "172.30.0.9", protocol=protocol, **spec),
               slice_("ns", "svc", *endpoints, protocol=protocol))
    result = planned(*objects)
    assert gaps_of(result) == ({"ns/svc:p80": expected} if expected else {})
    external = [e for f, e in result.entries.items() if f.ip != "172.30.0.9"]
    assert all(e.external_stack == bool(expected) for e in external)


def test_masquerade_all_keeps_every_external_frontend_on_iptables() -> None:
    objects = (service("ns", "svc", "172.30.0.9", type_="NodePort", node_port=30001),
               slice_("ns", "svc", ep("10.0.0.1")))
    assert gaps_of(planned(*objects, masquerade_all=True)) == {"ns/svc:p80": (TcGap.MASQUERADE_ALL,)}


def test_inspect_shows_which_external_frontends_iptables_serves() -> None:
    from nodeagent.inspect.paths import ebpf_paths

    snapshot = snapshot_of(*OVERALL_OBJECTS, node=NODE)
    paths = {p.frontend: p.via for p in ebpf_paths(snapshot.service_ports, snapshot.endpoints,
                                                   [ip_address("192.168.0.2")])}
    assert paths["5.6.7.8:80/TCP"] == ("service map [5.6.7.8:80/TCP]; from outside: iptables (tc lacks: "
                                       "loadBalancerSourceRanges, sessionAffinity=ClientIP)")
    assert paths["192.168.0.2:3003/TCP"] == "service map [192.168.0.2:3003/TCP]"
