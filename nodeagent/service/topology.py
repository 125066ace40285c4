"""Which endpoints a Service port uses on this node: kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go),
shared by the iptables renderer and the eBPF maps so both modes choose alike. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nodeagent.cluster.model import ServiceType
from nodeagent.state.translation import EndpointInfo, ServicePortInfo

ZONE_LABEL = "topology.kubernetes.io/zone"
NO_ZONE_HINTS: frozenset[str] = frozenset()



@dataclass
class Categorized:
    cluster: list[EndpointInfo]
    local: list[EndpointInfo]
    reachable: list[EndpointInfo]
    has_any: bool


def externally_accessible(info: ServicePortInfo) -> bool:
    """NodePort, LoadBalancer or externalIPs: the Service takes traffic addressed to the node or beyond."""
    return info.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER) or bool(info.external_ips)


def uses_cluster_endpoints(info: ServicePortInfo) -> bool:
    """kube-proxy's `UsesClusterEndpoints`."""
    return not info.internal_policy_local or (externally_accessible(info) and not info.external_policy_local)


def uses_local_endpoints(info: ServicePortInfo) -> bool:
    """kube-proxy's `UsesLocalEndpoints`."""
    return info.internal_policy_local or (externally_accessible(info) and info.external_policy_local)


def categorize(endpoints: Sequence[EndpointInfo], info: ServicePortInfo, zone: str) -> Categorized:
    """kube-proxy's `CategorizeEndpoints`: ready endpoints, falling back to serving-terminating ones."""
    cluster: list[EndpointInfo] = []
    local: list[EndpointInfo] = []
    has_any = False
    topology = False
    if uses_cluster_endpoints(info):
        topology = _zone_topology(endpoints, zone)
        cluster = [e for e in endpoints if e.ready and (not topology or zone in e.zone_hints)]
        if not cluster:
            cluster = [e for e in endpoints if e.serving and e.terminating]
        has_any = bool(cluster)
    if not uses_local_endpoints(info):
        return Categorized(cluster, local, cluster, has_any)
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
        return Categorized(cluster, local, local, has_any)
    if not topology and not serving_terminating:
        return Categorized(cluster, local, cluster, has_any)
    merged = {str(e): e for e in cluster}
    merged.update((str(e), e) for e in local)
    return Categorized(cluster, local, list(merged.values()), has_any)


def _zone_topology(endpoints: Sequence[EndpointInfo], zone: str) -> bool:
    """Whether zone hints apply: every ready endpoint has one and some endpoint is hinted for this zone."""
    ready = [e for e in endpoints if e.ready]
    return bool(ready) and all(e.zone_hints for e in ready) and any(zone in e.zone_hints for e in ready)
