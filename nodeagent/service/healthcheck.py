"""Which Services get a health check node port listener on this node, where, and with how many local endpoints:
kube-proxy's `HealthCheckNodePorts()` and `LocalReadyEndpoints()`, decided from a snapshot. Pure; the listeners
are `nodeagent.observability.service_health`'s.

Per family, as kube-proxy runs a ServiceHealthServer in each family's proxier (pkg/proxy/healthcheck): a Service is
health-checked in the families it has a cluster IP of, on that family's NodePort addresses (`--nodeport-addresses`
split by family, kube-proxy's NodePortAddresses), or on every address of the family (an IPv4-only socket on
0.0.0.0, an IPv6-only one on [::], as kube-proxy binds each family's instance since its dual-stack fix: one
wildcard socket per family, which never collide), and answers with its local ready endpoints of that family.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from nodeagent.cluster.model import IPAddress, ServiceType
from nodeagent.observability.service_health import Listen, ServiceName
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName

WILDCARD = {4: "0.0.0.0", 6: "::"}


def listen_hosts(nodeport_ips: tuple[IPAddress, ...] | None, family: int = 4) -> tuple[str, ...]:
    """Where the listeners of `family` bind: every address of the family when `--nodeport-addresses` has no CIDR
    of it (kube-proxy's MatchAll), else each of the node's addresses it selects."""
    if nodeport_ips is None:
        return (WILDCARD[family],)
    return tuple(str(ip) for ip in nodeport_ips if ip.version == family)


def health_check_ports(ports: Iterable[ServicePortInfo], nodeport_ips: tuple[IPAddress, ...] | None,
                       nodeport_ips6: tuple[IPAddress, ...] | None = None, *,
                       ipv6: bool = False) -> dict[ServiceName, Listen]:
    """Service -> its listener, for every Service kube-proxy health-checks: type LoadBalancer with
    `externalTrafficPolicy: Local` and a healthCheckNodePort (one per Service, whatever its ports), on the
    addresses of each family it has a cluster IP of: IPv4's (`nodeport_ips`, the IPv4 proxier's) and, with
    `ipv6` (the node serves IPv6), IPv6's (`nodeport_ips6`)."""
    hosts = {4: listen_hosts(nodeport_ips, 4), 6: listen_hosts(nodeport_ips6, 6) if ipv6 else ()}
    wanted: dict[ServiceName, Listen] = {}
    for info in ports:
        if (info.type is ServiceType.LOAD_BALANCER and info.external_policy_local
                and info.health_check_node_port):
            service = ServiceName(info.name.namespace, info.name.name)
            served = sorted(family for family in info.families if family == 4 or ipv6)
            if not served:  # an IPv6 Service on a node without the IPv6 proxier: no proxier checks it
                continue
            where = tuple(dict.fromkeys((*(wanted[service].hosts if service in wanted else ()),
                                         *(host for family in served for host in hosts[family]))))
            # no address at all (`primary` before the node IP is known) is still the Service's listener, on nothing
            wanted[service] = Listen(info.health_check_node_port, where)
    return wanted


def local_ready_endpoints(endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]],
                          only: Collection[ServiceName] | None = None,
                          family: int | None = None) -> dict[ServiceName, int]:
    """Service -> the number of distinct addresses of its endpoints that are on this node and ready (not
    terminating), over all its ports; Services without any are absent (kube-proxy's LocalReadyEndpoints).
    `only`: count just these Services (the health-checked ones: a sync need not walk every endpoint). `family`:
    count only addresses of that family (each family's proxier counts its own endpoints)."""
    addresses: dict[ServiceName, set[IPAddress]] = {}
    for port, infos in endpoints.items():
        if only is not None and ServiceName(port.namespace, port.name) not in only:
            continue
        for info in infos:
            if info.is_local and info.ready and (family is None or info.ip.version == family):
                addresses.setdefault(ServiceName(port.namespace, port.name), set()).add(info.ip)
    return {service: len(ips) for service, ips in sorted(addresses.items())}


def no_local_endpoints(ports: Mapping[ServicePortName, ServicePortInfo],
                       endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]]) -> tuple[int, int]:
    """(internal, external): the Service ports with a Local internal (external) traffic policy whose traffic is
    dropped on this node because it has no usable local endpoint while the cluster has some (kube-proxy's
    sync_proxy_rules_no_local_endpoints_total; a port without any usable endpoint is rejected, not counted).
    Usable: ready, or serving and terminating (kube-proxy's fallback when none is ready)."""
    internal = external = 0
    for name, info in ports.items():
        if not (info.internal_policy_local or info.external_policy_local):
            continue
        usable = [e for e in endpoints.get(name, ()) if e.ready or (e.serving and e.terminating)]
        if not usable or any(e.is_local for e in usable):
            continue
        internal += info.internal_policy_local
        external += info.external_policy_local
    return internal, external
