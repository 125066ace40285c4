"""Endpoint selection per Service port, against kube-proxy's TestCategorizeEndpoints (pkg/proxy/topology_test.go).

The zone and traffic-policy cases are kube-proxy's (names, inputs and expected sets; the hints annotation
some of them carry no longer matters upstream, nor here). The node-hint cases
(trafficDistribution: PreferSameNode, `hints.forNodes`) are derived from kube-proxy's topologyModeFromHints
and availableForTopology, because the upstream cases for node hints could not be read here; each says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address

import pytest

from nodeagent.cluster.model import Protocol, ServiceType
from nodeagent.service.topology import TopologyMode, categorize, topology_mode
from nodeagent.state.translation import NO_HINTS, EndpointInfo, ServicePortInfo, ServicePortName
from tests.support.services import ep, service, slice_, snapshot_of

NODE = "test-node"


def endpoint(ip: str, *, zones: tuple[str, ...] | None = (), nodes: tuple[str, ...] | None = (), ready: bool = True,
             serving: bool | None = None, terminating: bool = False, local: bool = False) -> EndpointInfo:
    node_hints = frozenset(nodes) if nodes else NO_HINTS
    return EndpointInfo(ip=ip_address(ip), port=80, ready=ready, serving=ready if serving is None else serving,
                        terminating=terminating, node_name=NODE if local else None, is_local=local,
                        zone_hints=frozenset(zones) if zones else NO_HINTS, pod=None, node_hints=node_hints,
                        hinted_for_node=NODE in node_hints)


def port_info(*, internal_local: bool = False, external_local: bool = False,
              node_port: int | None = None) -> ServicePortInfo:
    """kube-proxy's BaseServicePortInfo as the test cases set it (a nodePort makes it externally accessible)."""
    return ServicePortInfo(
        name=ServicePortName("ns", "svc", "p80", Protocol.TCP),
        type=ServiceType.NODE_PORT if node_port else ServiceType.CLUSTER_IP, cluster_ips=(ip_address("10.96.0.1"),),
        port=80, protocol=Protocol.TCP, target_port=80, node_port=node_port, external_ips=(), load_balancer_ips=(),
        load_balancer_source_ranges=(), affinity_timeout_seconds=None,
        external_policy_local=external_local and node_port is not None, internal_policy_local=internal_local,
        health_check_node_port=None, topology_mode="")


@dataclass
class Case:
    name: str
    zone: str
    info: ServicePortInfo
    endpoints: list[EndpointInfo]
    cluster: set[str] | None
    local: set[str] | None = None
    reachable: set[str] | None = None  # None: the cluster set, or the local one when there is no cluster set
    node_hints: bool = True
    mode: TopologyMode = TopologyMode.NONE
    only_remote: bool = False


def zone_eps(*spec: tuple[str, tuple[str, ...] | None, bool]) -> list[EndpointInfo]:
    return [endpoint(f"10.1.2.{ip}", zones=zones, ready=ready) for ip, zones, ready in spec]


A, B, C, D = ("zone-a",), ("zone-b",), ("zone-c",), ("zone-d",)
CASES = [
    # --- kube-proxy's cases (TestCategorizeEndpoints) ---
    Case("should use topology since all endpoints have hints, node has a zone label and and there are endpoints "
         "for the node's zone", "zone-a", port_info(),
         zone_eps(("3", A, True), ("4", B, True), ("5", C, True), ("6", A, True)),
         {"10.1.2.3:80", "10.1.2.6:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("externalTrafficPolicy: Local, topology ignored for Local endpoints", "zone-a",
         port_info(external_local=True, node_port=8080),
         [endpoint("10.1.2.3", zones=A, local=True), endpoint("10.1.2.4", zones=B, local=True),
          endpoint("10.1.2.5", zones=C), endpoint("10.1.2.6", zones=A)],
         {"10.1.2.3:80", "10.1.2.6:80"}, {"10.1.2.3:80", "10.1.2.4:80"},
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("internalTrafficPolicy: Local, topology ignored for Local endpoints", "zone-a",
         port_info(internal_local=True, node_port=8080),
         [endpoint("10.1.2.3", zones=A, local=True), endpoint("10.1.2.4", zones=B, local=True),
          endpoint("10.1.2.5", zones=C), endpoint("10.1.2.6", zones=A)],
         {"10.1.2.3:80", "10.1.2.6:80"}, {"10.1.2.3:80", "10.1.2.4:80"},
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("empty node labels", "", port_info(), zone_eps(("3", A, True)), {"10.1.2.3:80"}),
    Case("empty zone label", "", port_info(), zone_eps(("3", A, True)), {"10.1.2.3:80"}),
    Case("node in different zone, no endpoint filtering", "zone-b", port_info(), zone_eps(("3", A, True)),
         {"10.1.2.3:80"}),
    Case("normal endpoint filtering", "zone-a", port_info(),
         zone_eps(("3", A, True), ("4", B, True), ("5", C, True), ("6", A, True)),
         {"10.1.2.3:80", "10.1.2.6:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("unready endpoint", "zone-a", port_info(),
         zone_eps(("3", A, True), ("4", B, True), ("5", C, True), ("6", A, False)),
         {"10.1.2.3:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("only unready endpoints in same zone (should not filter)", "zone-a", port_info(),
         zone_eps(("3", A, False), ("4", B, True), ("5", C, True), ("6", A, False)),
         {"10.1.2.4:80", "10.1.2.5:80"}),
    Case("normal endpoint filtering, Auto annotation", "zone-a", port_info(),
         zone_eps(("3", A, True), ("4", B, True), ("5", C, True), ("6", A, True)),
         {"10.1.2.3:80", "10.1.2.6:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("missing hints, no filtering applied", "zone-a", port_info(),
         zone_eps(("3", A, True), ("4", B, True), ("5", C, True), ("6", None, True)),
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"}),
    Case("multiple hints per endpoint, filtering includes any endpoint with zone included", "zone-c", port_info(),
         zone_eps(("3", ("zone-a", "zone-b", "zone-c"), True), ("4", ("zone-b", "zone-c"), True),
                  ("5", ("zone-b", "zone-d"), True), ("6", C, True)),
         {"10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("conflicting topology and localness require merging allEndpoints", "zone-a",
         port_info(internal_local=False, external_local=True, node_port=8080),
         [endpoint("10.0.0.0", zones=A, local=True), endpoint("10.0.0.1", zones=B, local=True),
          endpoint("10.0.0.2", zones=A), endpoint("10.0.0.3", zones=B)],
         {"10.0.0.0:80", "10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.1:80"},
         {"10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("internalTrafficPolicy: Local, with empty endpoints", "", port_info(internal_local=True), [], None, set(),
         set()),
    Case("internalTrafficPolicy: Local, but all endpoints are remote", "", port_info(internal_local=True),
         [endpoint("10.0.0.0"), endpoint("10.0.0.1")], None, set(), set(), only_remote=True),
    Case("internalTrafficPolicy: Local, all endpoints are local", "", port_info(internal_local=True),
         [endpoint("10.0.0.0", local=True), endpoint("10.0.0.1", local=True)], None,
         {"10.0.0.0:80", "10.0.0.1:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("internalTrafficPolicy: Local, some endpoints are local", "", port_info(internal_local=True),
         [endpoint("10.0.0.0", local=True), endpoint("10.0.0.1")], None, {"10.0.0.0:80"}, {"10.0.0.0:80"}),
    Case("Cluster traffic policy, endpoints not Ready", "", port_info(),
         [endpoint("10.0.0.0", ready=False), endpoint("10.0.0.1", ready=False)], set()),
    Case("Cluster traffic policy, some endpoints are Ready", "", port_info(),
         [endpoint("10.0.0.0", ready=False), endpoint("10.0.0.1")], {"10.0.0.1:80"}),
    Case("Cluster traffic policy, all endpoints are terminating", "", port_info(),
         [endpoint("10.0.0.0", ready=False, serving=True, terminating=True),
          endpoint("10.0.0.1", ready=False, serving=True, terminating=True)], {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Cluster, some endpoints local", "", port_info(internal_local=True, node_port=8080),
         [endpoint("10.0.0.0", local=True), endpoint("10.0.0.1")], {"10.0.0.0:80", "10.0.0.1:80"},
         {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Cluster, eTP: Local, some endpoints local", "", port_info(external_local=True, node_port=8080),
         [endpoint("10.0.0.0", local=True), endpoint("10.0.0.1")], {"10.0.0.0:80", "10.0.0.1:80"},
         {"10.0.0.0:80"}, {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("iTP: Local, eTP: Local, some endpoints local", "",
         port_info(internal_local=True, external_local=True, node_port=8080),
         [endpoint("10.0.0.0", local=True), endpoint("10.0.0.1")], None, {"10.0.0.0:80"}, {"10.0.0.0:80"}),
    Case("iTP: Local, eTP: Local, all endpoints remote", "",
         port_info(internal_local=True, external_local=True, node_port=8080),
         [endpoint("10.0.0.0"), endpoint("10.0.0.1")], None, set(), set(), only_remote=True),
    Case("iTP: Local, eTP: Local, all endpoints remote and terminating", "",
         port_info(internal_local=True, external_local=True, node_port=8080),
         [endpoint("10.0.0.0", ready=False, serving=True, terminating=True),
          endpoint("10.0.0.1", ready=False, serving=True, terminating=True)], None, set(), set(), only_remote=True),
    Case("iTP: Cluster, eTP: Local, with terminating endpoints", "", port_info(external_local=True, node_port=8080),
         [endpoint("10.0.0.0"), endpoint("10.0.0.1", ready=False, serving=False, local=True),
          endpoint("10.0.0.2", ready=False, serving=True, terminating=True, local=True),
          endpoint("10.0.0.3", ready=False, serving=True, terminating=True)],
         {"10.0.0.0:80"}, {"10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.2:80"}),
    Case("externalTrafficPolicy ignored if not externally accessible", "", port_info(external_local=True),
         [endpoint("10.0.0.0", local=True), endpoint("10.0.0.1")], {"10.0.0.0:80", "10.0.0.1:80"}),
    Case("no cluster endpoints for iTP:Local internal-only service", "", port_info(internal_local=True),
         [endpoint("10.0.0.0"), endpoint("10.0.0.1", local=True)], None, {"10.0.0.1:80"}, {"10.0.0.1:80"}),
    # --- node hints (PreferSameNode): derived from topologyModeFromHints / availableForTopology ---
    Case("derived: every ready endpoint has node hints and one names this node: only those", "zone-a", port_info(),
         [endpoint("10.1.2.3", nodes=(NODE,), zones=A), endpoint("10.1.2.4", nodes=("other",), zones=A),
          endpoint("10.1.2.5", nodes=("other", NODE), zones=B), endpoint("10.1.2.6", nodes=("third",), zones=A)],
         {"10.1.2.3:80", "10.1.2.5:80"}, mode=TopologyMode.PREFER_SAME_NODE),
    Case("derived: one ready endpoint without node hints: zone hints decide", "zone-a", port_info(),
         [endpoint("10.1.2.3", nodes=(NODE,), zones=B), endpoint("10.1.2.4", zones=A),
          endpoint("10.1.2.5", nodes=("other",), zones=A)],
         {"10.1.2.4:80", "10.1.2.5:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("derived: node hints for other nodes only: zone hints decide", "zone-a", port_info(),
         [endpoint("10.1.2.3", nodes=("other",), zones=A), endpoint("10.1.2.4", nodes=("third",), zones=B)],
         {"10.1.2.3:80"}, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("derived: node hints for other nodes only, no zone hints: no topology", "zone-a", port_info(),
         [endpoint("10.1.2.3", nodes=("other",)), endpoint("10.1.2.4", nodes=("third",))],
         {"10.1.2.3:80", "10.1.2.4:80"}),
    Case("derived: an unready endpoint neither breaks nor makes node mode", "zone-a", port_info(),
         [endpoint("10.1.2.3", nodes=(NODE,), ready=False), endpoint("10.1.2.4", nodes=("other",)),
          endpoint("10.1.2.5", ready=False)],
         {"10.1.2.4:80"}),
    Case("derived: the only endpoint for this node is unready: the others, unfiltered", "", port_info(),
         [endpoint("10.1.2.3", nodes=(NODE,), ready=False), endpoint("10.1.2.4", nodes=("other",)),
          endpoint("10.1.2.5", nodes=("third",))],
         {"10.1.2.4:80", "10.1.2.5:80"}),
    Case("derived: the gate off ignores node hints: zone hints decide", "zone-a", port_info(),
         [endpoint("10.1.2.3", nodes=(NODE,), zones=B), endpoint("10.1.2.4", nodes=("other",), zones=A)],
         {"10.1.2.4:80"}, node_hints=False, mode=TopologyMode.PREFER_SAME_ZONE),
    Case("derived: node mode narrows only the cluster endpoints, Local policy merged in", "",
         port_info(external_local=True, node_port=8080),
         [endpoint("10.0.0.0", nodes=(NODE,), local=True), endpoint("10.0.0.1", nodes=("other",)),
          endpoint("10.0.0.2", nodes=(NODE,)), endpoint("10.0.0.3", nodes=("other",), local=True)],
         {"10.0.0.0:80", "10.0.0.2:80"}, {"10.0.0.0:80", "10.0.0.3:80"},
         {"10.0.0.0:80", "10.0.0.2:80", "10.0.0.3:80"}, mode=TopologyMode.PREFER_SAME_NODE),
    Case("derived: node mode, none ready: serving-terminating endpoints, topology ignored", "", port_info(),
         [endpoint("10.0.0.0", nodes=("other",), ready=False, serving=True, terminating=True),
          endpoint("10.0.0.1", nodes=(NODE,), ready=False, serving=False)],
         {"10.0.0.0:80"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_categorize_endpoints(case: Case) -> None:
    got = categorize(case.endpoints, case.info, case.zone, node_hints=case.node_hints)
    assert got.topology is case.mode
    if case.cluster is None:
        assert got.cluster == []
    else:
        assert {str(e) for e in got.cluster} == case.cluster
    assert {str(e) for e in got.local} == (case.local or set())
    reachable = case.reachable if case.reachable is not None else (
        case.cluster if case.cluster is not None else case.local or set())
    assert {str(e) for e in got.reachable} == reachable
    # kube-proxy's onlyRemoteEndpoints: endpoints exist, none of them usable by a Local policy here
    assert (got.has_any and not got.local and not got.cluster) is case.only_remote


def test_node_hints_come_from_the_slice_and_name_this_node_by_the_trackers_node_name() -> None:
    raw = slice_("ns", "svc", {**ep("10.0.0.1"), "hints": {"forNodes": [{"name": NODE}], "forZones": [{"name": "a"}]}},
                 {**ep("10.0.0.2"), "hints": {"forNodes": [{"name": "other"}]}})
    snapshot = snapshot_of(service("ns", "svc", "10.96.0.9"), raw, node=NODE)
    (endpoints,) = snapshot.endpoints.values()
    assert [(str(e), sorted(e.node_hints), e.hinted_for_node) for e in endpoints] == [
        ("10.0.0.1:80", [NODE], True), ("10.0.0.2:80", ["other"], False)]
    assert topology_mode(endpoints, "a") is TopologyMode.PREFER_SAME_NODE
    (info,) = snapshot.service_ports.values()
    assert [str(e) for e in categorize(endpoints, info, "a").reachable] == ["10.0.0.1:80"]
