"""Which endpoints a Service port uses on this node: kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go),
shared by the iptables renderer and the eBPF maps so both modes choose alike. Pure.

Topology (kube-proxy's `topologyModeFromHints`): kube-proxy never reads `spec.trafficDistribution`; the
EndpointSlice controller turns it into hints, `forNodes` for PreferSameNode and `forZones` for
PreferSameZone/PreferClose, and kube-proxy follows the hints. Node hints first: when every ready endpoint
has one and some ready endpoint names this node, only those endpoints get cluster traffic. Otherwise zone
hints, alike with this node's `topology.kubernetes.io/zone`. Otherwise no topology. It narrows only the
Cluster-policy endpoints; Local policy is node-local already, and the terminating fallback ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from nodeagent.cluster.model import ServiceType
from nodeagent.state.translation import EndpointInfo, ServicePortInfo

ZONE_LABEL = "topology.kubernetes.io/zone"
NO_ZONE_HINTS: frozenset[str] = frozenset()


class TopologyMode(StrEnum):
    """Which hints choose the cluster endpoints (kube-proxy names the modes after trafficDistribution)."""

    NONE = ""
    PREFER_SAME_NODE = "PreferSameNode"
    PREFER_SAME_ZONE = "PreferSameZone"


@dataclass
class Categorized:
    cluster: list[EndpointInfo]
    local: list[EndpointInfo]
    reachable: list[EndpointInfo]
    has_any: bool
    topology: TopologyMode = TopologyMode.NONE


def externally_accessible(info: ServicePortInfo) -> bool:
    """NodePort, LoadBalancer or externalIPs: the Service takes traffic addressed to the node or beyond."""
    return info.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) or bool(info.external_ips)


def uses_cluster_endpoints(info: ServicePortInfo) -> bool:
    """kube-proxy's `UsesClusterEndpoints`."""
    return not info.internal_policy_local or (externally_accessible(info) and not info.external_policy_local)


def uses_local_endpoints(info: ServicePortInfo) -> bool:
    """kube-proxy's `UsesLocalEndpoints`."""
    return info.internal_policy_local or (externally_accessible(info) and info.external_policy_local)


def categorize(endpoints: Sequence[EndpointInfo], info: ServicePortInfo, zone: str, *,
               node_hints: bool = True) -> Categorized:
    """kube-proxy's `CategorizeEndpoints`: ready endpoints (narrowed by topology), falling back to
    serving-terminating ones. `node_hints` is kube-proxy's PreferSameTrafficDistribution feature gate
    (beta and on by default since 1.34, GA in 1.35): off, node hints are ignored."""
    cluster: list[EndpointInfo] = []
    local: list[EndpointInfo] = []
    has_any = False
    mode = TopologyMode.NONE
    if uses_cluster_endpoints(info):
        mode = topology_mode(endpoints, zone, node_hints=node_hints)
        cluster = [e for e in endpoints if e.ready and _available(e, mode, zone)]
        if not cluster:
            cluster = [e for e in endpoints if e.serving and e.terminating]
        has_any = bool(cluster)
    if not uses_local_endpoints(info):
        return Categorized(cluster, local, cluster, has_any, mode)
    local_ready = local_terminating = False
    for e in endpoints:
        if e.ready:
            has_any = True
            local_ready = local_ready or e.is_local
        elif e.serving and e.terminating:
            has_any = True
            local_terminating = local_terminating or e.is_local
    serving_terminating = False
    if local_ready:
        local = [e for e in endpoints if e.is_local and e.ready]
    elif local_terminating:
        serving_terminating = True
        local = [e for e in endpoints if e.is_local and e.serving and e.terminating]
    if not uses_cluster_endpoints(info):
        return Categorized(cluster, local, local, has_any, mode)
    if mode is TopologyMode.NONE and not serving_terminating:
        return Categorized(cluster, local, cluster, has_any, mode)
    merged = {str(e): e for e in cluster}
    merged.update((str(e), e) for e in local)
    return Categorized(cluster, local, list(merged.values()), has_any, mode)


def topology_mode(endpoints: Sequence[EndpointInfo], zone: str, *, node_hints: bool = True) -> TopologyMode:
    """kube-proxy's `topologyModeFromHints`: only ready endpoints count; a mode applies when every one of
    them has hints of its kind and some of them are hinted for this node (or its zone)."""
    has_for_node = has_for_zone = False
    all_node_hints = all_zone_hints = True
    for e in endpoints:
        if not e.ready:
            continue
        if not e.node_hints:
            all_node_hints = False
        elif e.hinted_for_node:
            has_for_node = True
        if not e.zone_hints:
            all_zone_hints = False
        elif zone in e.zone_hints:
            has_for_zone = True
    if node_hints and all_node_hints and has_for_node:
        return TopologyMode.PREFER_SAME_NODE
    if all_zone_hints and has_for_zone:
        return TopologyMode.PREFER_SAME_ZONE
    return TopologyMode.NONE


def _available(endpoint: EndpointInfo, mode: TopologyMode, zone: str) -> bool:
    """kube-proxy's `availableForTopology`."""
    if mode is TopologyMode.PREFER_SAME_NODE:
        return endpoint.hinted_for_node
    if mode is TopologyMode.PREFER_SAME_ZONE:
        return zone in endpoint.zone_hints
    return True
