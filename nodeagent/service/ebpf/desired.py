"""Snapshot -> the entries the socket load balancer's maps must hold. Pure.

Which frontends a Service port gets, and which endpoints each frontend uses, follow kube-proxy's
semantics for traffic that starts on this node (the only traffic a cgroup program sees):
- its cluster IP uses the internal-policy endpoints (Local: this node's only);
- its external IPs, load-balancer IPs and NodePort on this node's addresses use the Cluster-policy
  endpoints even with externalTrafficPolicy Local, as kube-proxy short-circuits pod and host traffic
  to external destinations ("pod traffic for ... external destinations");
- ready endpoints, else serving-terminating ones, and zone hints, exactly as the iptables renderer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nodeagent.cluster.model import IPAddress, Protocol
from nodeagent.service.topology import ZONE_LABEL, categorize, uses_cluster_endpoints
from nodeagent.state.translation import EndpointInfo, ServicePortInfo, ServicePortName

PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}  # IPPROTO_* (linux/in.h): svc_key.proto

# must match `struct svc_key` in bpf-src/lib/maps.h (the na_services key): the address and port in network
# order as the programs read them from the socket or packet, the protocol number, a pad byte (zero).
SERVICE_KEY = struct.Struct(">4sHBx")


@dataclass(frozen=True, order=True)
class Frontend:
    """An address a client may dial: (ip, port, protocol number). Its map key is `key`."""

    ip: str
    port: int
    protocol: int

    @property
    def key(self) -> bytes:
        """Its na_services key (`struct svc_key`)."""
        return SERVICE_KEY.pack(socket.inet_aton(self.ip), self.port, self.protocol)

    @classmethod
    def from_key(cls, key: bytes) -> Frontend:
        """The frontend of an na_services key (`struct svc_key`)."""
        ip, port, protocol = SERVICE_KEY.unpack(key)
        return cls(socket.inet_ntoa(ip), port, protocol)

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}/{ {6: 'TCP', 17: 'UDP', 132: 'SCTP'}.get(self.protocol, self.protocol)}"


@dataclass(frozen=True, order=True)
class Backend:
    ip: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class ServiceEntry:
    """What one frontend resolves to."""

    port_name: str
    backends: tuple[Backend, ...]
    affinity_seconds: int = 0


def desired_entries(service_ports: Mapping[ServicePortName, ServicePortInfo],
                    endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]], *, node_ips: Iterable[IPAddress],
                    node_labels: Mapping[str, str] | None = None,
                    only: set[ServicePortName] | None = None) -> dict[Frontend, ServiceEntry]:
    """Every frontend and its entry (for the ports in `only`, when given)."""
    zone = (node_labels or {}).get(ZONE_LABEL, "")
    node_v4 = [str(ip) for ip in node_ips if ip.version == 4]
    out: dict[Frontend, ServiceEntry] = {}
    for name, info in service_ports.items():
        if only is not None and name not in only:
            continue
        proto = PROTOCOL_NUMBERS[info.protocol]
        eps = [e for e in endpoints.get(name, ()) if e.ip.version == 4]
        cat = categorize(eps, info, zone)
        internal = cat.local if info.internal_policy_local else cat.cluster
        external = cat.cluster if uses_cluster_endpoints(info) else cat.local
        affinity = info.affinity_timeout_seconds or 0
        label = str(name)

        weights = dict(info.endpoint_weights)

        def entry(chosen: Sequence[EndpointInfo], label: str = label, affinity: int = affinity,
                  weights: dict[str, int] = weights) -> ServiceEntry:
            members = ((e, weights.get(e.pod.name, 1) if e.pod is not None else 1) for e in chosen)
            return ServiceEntry(label, tuple(Backend(str(e.ip), e.port, w) for e, w in members if w > 0), affinity)

        for address in info.cluster_ips:
            if address.version == 4:
                out[Frontend(str(address), info.port, proto)] = entry(internal)
        for address in (*info.external_ips, *info.load_balancer_ips):
            if address.version == 4:
                out[Frontend(str(address), info.port, proto)] = entry(external)
        if info.node_port:
            for node_ip in node_v4:
                out[Frontend(node_ip, info.node_port, proto)] = entry(external)
    return out
