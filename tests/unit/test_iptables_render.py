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

from nodeagent.decode import decode, object_ref
from nodeagent.events import Listed
from nodeagent.iptables import names
from nodeagent.iptables.render import ProxyConfig, probability, render
from nodeagent.model import Kind
from nodeagent.state import ChangeTracker, Snapshot
from tests.iptables_dump import sort_rules

FAKE_PROXIER = ProxyConfig(node_name="test-node", node_ip=ipaddress.ip_address("192.168.0.2"),
                           cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),), masquerade_mark="0x4000",
                           nfacct=True)


def service(namespace: str, name: str, cluster_ip: str, *, type_: str = "ClusterIP", node_port: int | None = None,
            port_name: str = "p80", port: int = 80, protocol: str = "TCP", **spec: Any) -> dict[str, Any]:
    port_spec: dict[str, Any] = {"name": port_name, "port": port, "protocol": protocol, "targetPort": port}
    if node_port is not None:
        port_spec["nodePort"] = node_port
    status = spec.pop("status", {})
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": type_, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [port_spec], **spec},
            "status": status}


def slice_(namespace: str, service_name: str, *endpoints: dict[str, Any], port: int = 80, port_name: str = "p80",
           protocol: str = "TCP") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "endpoints": list(endpoints),
            "ports": [{"name": port_name, "port": port, "protocol": protocol}]}


def ep(ip: str, node: str | None = None, **conditions: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"addresses": [ip]}
    if conditions:
        body["conditions"] = conditions
    if node is not None:
        body["nodeName"] = node
    return body


def snapshot_of(*objects: dict[str, Any], node: str = "test-node") -> Snapshot:
    tracker = ChangeTracker(node)
    by_kind: dict[Kind, list[Any]] = {kind: [] for kind in Kind}
    for raw in objects:
        decoded = decode(raw)
        assert not decoded.rejections, decoded.rejections
        by_kind[Kind(raw["kind"])].append((object_ref(raw), decoded))
    tracker.apply_all(Listed(kind, tuple(items), "1") for kind, items in by_kind.items())
    snapshot = tracker.snapshot()
    assert snapshot is not None
    return snapshot


def rules(snapshot: Snapshot, config: ProxyConfig = FAKE_PROXIER, **kwargs: Any) -> str:
    return render(snapshot.service_ports, snapshot.endpoints, config, **kwargs).text()


def assert_rules(actual: str, expected: str) -> None:
    assert sort_rules(actual).splitlines() == sort_rules(dedent(expected)).splitlines()


OVERALL_OBJECTS = (
    service("ns1", "svc1", "172.30.0.41"),
    service("ns2", "svc2", "172.30.0.42", type_="LoadBalancer", node_port=3001, externalTrafficPolicy="Local",
            externalIPs=["192.168.99.22"], healthCheckNodePort=30000,
            status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}),
    service("ns3", "svc3", "172.30.0.43", type_="NodePort", node_port=3003),
    service("ns4", "svc4", "172.30.0.44", type_="NodePort", externalIPs=["192.168.99.33"]),
    service("ns5", "svc5", "172.30.0.45", type_="LoadBalancer", node_port=3002, externalTrafficPolicy="Cluster",
            healthCheckNodePort=30000, loadBalancerSourceRanges=[" 203.0.113.0/25"], sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
            status={"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}),
    service("ns6", "svc6", "172.30.0.46"),
    slice_("ns1", "svc1", ep("10.180.0.1")),
    slice_("ns2", "svc2", ep("10.180.0.2")),
    slice_("ns3", "svc3", ep("10.180.0.3")),
    slice_("ns4", "svc4", ep("10.180.0.4"), ep("10.180.0.5", node="test-node")),
    slice_("ns5", "svc5", ep("10.180.0.3")),
)

OVERALL_EXPECTED = (Path(__file__).parent.parent / "golden" / "kube-proxy-overall.rules").read_text()


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
