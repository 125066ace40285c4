"""What one Service means to a proxy: its ports and, per port, the endpoints behind it. Pure functions.

This is kube-proxy's `ServicePortInfo` and `EndpointSliceCache` reduced to data: every datapath
(iptables, eBPF, the tunnel's balancer, inspect) reads the same `ServicePortInfo` and the same
ordered `EndpointInfo` tuples, so they cannot disagree about what a Service translates to.

Endpoint merging follows kube-proxy's `EndpointSliceCache.addEndpoints`: a slice port without a
port number is ignored, only an endpoint's first address is used, duplicates across slices are
merged (a local duplicate wins), and endpoints are ordered by their `ip:port` string, as kube-proxy
orders them before rendering (which is what makes its iptables output, and ours, deterministic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address

from nodeagent.cluster.model import (
    AddressType,
    EndpointSlice,
    IPAddress,
    IPFamilyPolicy,
    IPNetwork,
    Kind,
    ObjectRef,
    Protocol,
    Rejection,
    Service,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)

# shared by every endpoint without zone (or node) hints (almost all): an empty frozenset each was 216 bytes
# per endpoint, 20 MB at 100,000 endpoints
NO_HINTS: frozenset[str] = frozenset()
TOPOLOGY_MODE_ANNOTATIONS = ("service.kubernetes.io/topology-mode", "service.kubernetes.io/topology-aware-hints")


@dataclass(frozen=True, order=True, slots=True)
class ServicePortName:
    """A Service port as kube-proxy names it: `namespace/name:port` (and the protocol, not printed)."""

    namespace: str
    name: str
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}" if self.port else f"{self.namespace}/{self.name}"

    @property
    def service(self) -> ObjectRef:
        """The Service this port belongs to."""
        return ObjectRef(Kind.SERVICE, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    """Everything about one Service port that changes how traffic to it is translated."""

    name: ServicePortName
    type: ServiceType
    cluster_ips: tuple[IPAddress, ...]
    port: int
    protocol: Protocol
    target_port: int | str
    node_port: int | None
    external_ips: tuple[IPAddress, ...]
    load_balancer_ips: tuple[IPAddress, ...]
    load_balancer_source_ranges: tuple[IPNetwork, ...]
    affinity_timeout_seconds: int | None  # None: no session affinity
    external_policy_local: bool
    internal_policy_local: bool
    health_check_node_port: int | None
    topology_mode: str
    endpoint_weights: tuple[tuple[str, int], ...] = ()  # pod name -> weight (see model.Service)

    @property
    def families(self) -> tuple[int, ...]:
        """The families this port has a cluster IP of (primary first): the proxiers that program it."""
        return tuple(ip.version for ip in self.cluster_ips)

    def for_family(self, family: int) -> ServicePortInfo | None:
        """The port as the proxier of `family` sees it, or None when the Service has no cluster IP of `family`.

        kube-proxy's ServiceChangeTracker builds one ServicePort per family: `newBaseServiceInfo` takes the
        family's clusterIP (GetClusterIPByFamily; none: the Service is skipped) and keeps the externalIPs,
        loadBalancerSourceRanges and load balancer VIPs of that family only (MapIPsByIPFamily,
        MapCIDRsByIPFamily) (pkg/proxy/serviceport.go, servicechangetracker.go)."""
        if len(self.cluster_ips) == 1:  # single-stack (nearly every Service): the cheap way
            if self.cluster_ips[0].version != family:
                return None
            # the decoder keeps no external or VIP address of a family without a cluster IP; source ranges may mix
            if not self.load_balancer_source_ranges or all(c.version == family
                                                           for c in self.load_balancer_source_ranges):
                return self  # the same object: nothing to filter
        cluster_ip = next((ip for ip in self.cluster_ips if ip.version == family), None)
        if cluster_ip is None:
            return None
        return dataclasses.replace(
            self, cluster_ips=(cluster_ip,),
            external_ips=tuple(ip for ip in self.external_ips if ip.version == family),
            load_balancer_ips=tuple(ip for ip in self.load_balancer_ips if ip.version == family),
            load_balancer_source_ranges=tuple(c for c in self.load_balancer_source_ranges if c.version == family))


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One backend of one Service port, with the conditions that decide whether it gets traffic."""

    ip: IPAddress
    port: int
    ready: bool
    serving: bool
    terminating: bool
    node_name: str | None
    is_local: bool
    zone_hints: frozenset[str]
    pod: ObjectRef | None
    # hints.forNodes, and whether they name this node (kube-proxy's `NodeHints().Has(nodeName)`, with the
    # node name `is_local` is computed from, so topology needs no node name of its own)
    node_hints: frozenset[str] = NO_HINTS
    hinted_for_node: bool = False

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if isinstance(self.ip, IPv6Address) else f"{self.ip}:{self.port}"


def endpoints_of_family(endpoints: Sequence[EndpointInfo], family: int) -> list[EndpointInfo]:
    """The endpoints the proxier of `family` reads. kube-proxy's metaproxier hands each family's proxier only the
    EndpointSlices of its addressType; a slice holds addresses of its type only (the decoder drops the others),
    so filtering merged endpoints by address family is the same selection."""
    return [e for e in endpoints if e.ip.version == family]


def unserved_families(service: Service, served: frozenset[int]) -> tuple[Rejection, ...]:
    """A report for each family of `service` this node does not serve (no proxier of that family runs), naming
    the field; it rejects the whole Service when no family of it is served. Empty for a skipped Service."""
    if service.skip_reason is not None:
        return ()
    found = []
    families = service.families
    for i, (family, ip) in enumerate(zip(families, service.cluster_ips, strict=False)):
        if family in served:
            continue
        others = [f"{kind} {', '.join(str(a) for a in addresses)}" for kind, addresses in (
            ("externalIPs", [a for a in service.external_ips if a.version == family]),
            ("load balancer IPs", [g.ip for g in service.load_balancer_ingress if g.ip.version == family]))
            if addresses]
        reason = (f"IPv{family} is not served on this node (no IPv{family} node address, podCIDR or cluster CIDR): "
                  f"clusterIP {ip}{''.join(f', {o}' for o in others)} get no rules")
        if service.ip_family_policy is IPFamilyPolicy.REQUIRE_DUAL_STACK:
            reason += "; the Service requires dual-stack (RequireDualStack)"
        found.append(Rejection(service.ref, f"spec.ipFamilies[{i}]", reason,
                               whole_object=not any(f in served for f in families)))
    return tuple(found)


def service_port_infos(service: Service) -> tuple[ServicePortInfo, ...]:
    """The ports a proxy programs for `service` (none when the Service is skipped; see `skip_reason`)."""
    if service.skip_reason is not None:
        return ()
    externally_accessible = (service.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
                             or bool(service.external_ips))
    external_local = externally_accessible and service.external_traffic_policy is TrafficPolicy.LOCAL
    topology_mode = next((service.annotations[a] for a in TOPOLOGY_MODE_ANNOTATIONS if a in service.annotations), "")
    affinity = (service.affinity_timeout_seconds if service.session_affinity is SessionAffinity.CLIENT_IP else None)
    ref = service.ref
    return tuple(
        ServicePortInfo(
            name=ServicePortName(ref.namespace, ref.name, port.name, port.protocol),
            type=service.type,
            cluster_ips=service.cluster_ips,
            port=port.port,
            protocol=port.protocol,
            target_port=port.target_port,
            node_port=port.node_port,
            external_ips=service.external_ips,
            # kube-proxy's LoadBalancerVIPs: a Proxy-mode ingress IP gets no rule in any datapath
            load_balancer_ips=(tuple(i.ip for i in service.load_balancer_ingress if i.is_vip)
                               if service.type is ServiceType.LOAD_BALANCER else ()),
            load_balancer_source_ranges=(service.load_balancer_source_ranges
                                         if service.type is ServiceType.LOAD_BALANCER else ()),
            affinity_timeout_seconds=affinity,
            external_policy_local=external_local,
            internal_policy_local=service.internal_traffic_policy is TrafficPolicy.LOCAL,
            health_check_node_port=service.health_check_node_port if external_local else None,
            topology_mode=topology_mode,
            endpoint_weights=service.endpoint_weights,
        )
        for port in service.ports
    )


def merge_endpoints(service: ObjectRef, slices: Iterable[EndpointSlice],
                    node_name: str) -> dict[ServicePortName, tuple[EndpointInfo, ...]]:
    """The endpoints of every port of `service` found in its slices, merged and ordered as kube-proxy does."""
    merged: dict[ServicePortName, dict[str, EndpointInfo]] = {}
    for slice_ in sorted(slices, key=lambda s: s.ref.name):
        if slice_.address_type is AddressType.FQDN:
            continue
        for slice_port in slice_.ports:
            port_name = ServicePortName(service.namespace, service.name, slice_port.name, slice_port.protocol)
            by_string = merged.setdefault(port_name, {})
            for endpoint in slice_.endpoints:
                is_local = endpoint.node_name is not None and endpoint.node_name == node_name
                info = EndpointInfo(
                    ip=endpoint.addresses[0], port=slice_port.port, ready=endpoint.conditions.ready,
                    serving=endpoint.conditions.serving, terminating=endpoint.conditions.terminating,
                    node_name=endpoint.node_name, is_local=is_local,
                    zone_hints=frozenset(endpoint.hint_zones) if endpoint.hint_zones else NO_HINTS,
                    pod=endpoint.target,
                    node_hints=frozenset(endpoint.hint_nodes) if endpoint.hint_nodes else NO_HINTS,
                    hinted_for_node=node_name in endpoint.hint_nodes,
                )
                key = str(info)
                if key not in by_string or is_local:
                    by_string[key] = info
    return {name: tuple(by_string[k] for k in sorted(by_string)) for name, by_string in merged.items()}


def changed_ports(old_ports: Mapping[ServicePortName, ServicePortInfo],
                  new_ports: Mapping[ServicePortName, ServicePortInfo],
                  old_endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]],
                  new_endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]],
                  candidates: Iterable[ServicePortName] | None = None) -> set[ServicePortName]:
    """Service ports whose translation differs: added, removed, or with other settings or endpoints.

    A port counts only if a Service defines it before or after; endpoints for a port no Service has
    translate nothing. `candidates` limits the comparison (the ports of services known to be touched).
    """
    names = candidates if candidates is not None else set(old_ports) | set(new_ports)
    changed = set()
    for name in names:
        old, new = old_ports.get(name), new_ports.get(name)
        if old is None and new is None:
            continue
        if old != new or old_endpoints.get(name, ()) != new_endpoints.get(name, ()):
            changed.add(name)
    return changed
