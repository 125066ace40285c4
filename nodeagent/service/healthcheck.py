"""Which Services get a health check node port listener on this node, where, and with how many local endpoints:
kube-proxy's `HealthCheckNodePorts()` and `LocalReadyEndpoints()`, decided from a snapshot. Pure; the listeners
are `nodeagent.observability.service_health`'s.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from nodeagent.cluster.model import IPAddress, ServiceType
from nodeagent.observability.service_health import Listen, ServiceName
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName


def listen_hosts(nodeport_ips: tuple[IPAddress, ...] | None) -> tuple[str, ...]:
    """Where the listeners bind: every address when `--nodeport-addresses` is unset (kube-proxy's MatchAll),
    else each of the node's addresses it selects."""
    if nodeport_ips is None:
        return ("0.0.0.0",)
    return tuple(str(ip) for ip in nodeport_ips)


def health_check_ports(ports: Iterable[ServicePortInfo],
                       nodeport_ips: tuple[IPAddress, ...] | None) -> dict[ServiceName, Listen]:
    """Service -> its listener, for every Service kube-proxy health-checks: type LoadBalancer with
    `externalTrafficPolicy: Local` and a healthCheckNodePort (one per Service, whatever its ports)."""
    hosts = listen_hosts(nodeport_ips)
    wanted: dict[ServiceName, Listen] = {}
    for info in ports:
        if (info.type is ServiceType.LOAD_BALANCER and info.external_policy_local
                and info.health_check_node_port):
            wanted[ServiceName(info.name.namespace, info.name.name)] = Listen(info.health_check_node_port, hosts)
    return wanted


def local_ready_endpoints(endpoints: Mapping[ServicePortName, tuple[EndpointInfo, ...]],
                          only: Collection[ServiceName] | None = None) -> dict[ServiceName, int]:
    """Service -> the number of distinct addresses of its endpoints that are on this node and ready (not
    terminating), over all its ports; Services without any are absent (kube-proxy's LocalReadyEndpoints).
    `only`: count just these Services (the health-checked ones: a sync need not walk every endpoint)."""
    addresses: dict[ServiceName, set[IPAddress]] = {}
    for port, infos in endpoints.items():
        if only is not None and ServiceName(port.namespace, port.name) not in only:
            continue
        for info in infos:
            if info.is_local and info.ready:
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
